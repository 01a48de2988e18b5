"""`ternpool bench cluster`: the same job on simulated clusters of 1, 2, 4... nodes, side by side.

Each cluster is a real multi-node Ray cluster on this machine
(`ray.cluster_utils.Cluster`: one raylet per node, each with its own CPUs
and object store). The job (the same prompts every time) runs through the
real driver, coordinator and workers. Printed per cluster size: processing
throughput and the speed-up over the first size, the time workers stood
still waiting on the coordinator (lease calls, and idle with nothing to
run), and the coordinator's own time per shard against the mean shard time.

`coordinator_capacity` times the coordinator alone on a synthetic job, to
estimate how many nodes one coordinator can keep fed.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from ternpool.engine.options import DEFAULT_HEAD


def bench_cluster(model: str, nodes: tuple[int, ...] = (1, 2, 4), cpus_per_node: int = 1, streams: int = 32,
                  rows: int | None = None, max_tokens: int = 16, shard_rows: int = 16, head: str = DEFAULT_HEAD,
                  weights_format: str | None = None, object_store_mb: int = 128, json_path: str | None = None,
                  on_result=None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ternpool.engine.native import ensure_native

    from .bench_pool import bench_prompts

    rows = rows or 2 * streams * max(nodes)
    ensure_native(model, weights_format)  # convert once here, not in every simulated node's worker
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"prompt": bench_prompts(rows)}), src, row_group_size=shard_rows)
        from ternpool.engine.options import EngineConfig

        engine = EngineConfig(threads=cpus_per_node, slots=streams, head=head, weights_format=weights_format)
        for n in nodes:
            summary, cluster_s = run_on_cluster(n, cpus_per_node, str(src), model, str(Path(tmp) / f"out-{n}"),
                                                engine, max_tokens, shard_rows, object_store_mb << 20)
            run = _run_stats(n, cluster_s, summary)
            run["speedup"] = run["tokens_per_s"] / runs[0]["tokens_per_s"] if runs else 1.0
            runs.append(run)
            if on_result:
                on_result(run)
    result = {"model": model, "rows": rows, "max_tokens": max_tokens, "shard_rows": shard_rows,
              "streams_per_node": streams, "cpus_per_node": cpus_per_node, "head": head, "runs": runs}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def run_on_cluster(n: int, cpus: int, inputs: str, model: str, output: str, engine, max_tokens: int,
                   shard_rows: int, object_store: int = 128 << 20, **pool):
    """A job on a fresh simulated cluster of `n` nodes of `cpus` CPUs each (`engine`: the workers'
    EngineConfig; `pool`: more PoolConfig fields): (its JobSummary, seconds the cluster took to start).
    RuntimeError when it does not finish."""
    import ray
    from ray.cluster_utils import Cluster

    from ternpool.engine import SamplingParams

    from .driver import PoolConfig, submit

    node_args = dict(num_cpus=cpus, object_store_memory=object_store)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        for _ in range(n - 1):
            cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, include_dashboard=False)
        cluster_s = time.perf_counter() - t0
        summary = submit(inputs, model, output, pool=PoolConfig(address=cluster.address, engine=engine, **pool),
                         sampling=SamplingParams(max_tokens=max_tokens), shard_rows=shard_rows).wait()
    finally:
        ray.shutdown()
        cluster.shutdown()
    if summary.state != "finished":
        raise RuntimeError(f"the job on {n} node(s) ended {summary.state}: {summary.error}")
    return summary, cluster_s


def _run_stats(n: int, cluster_s: float, summary) -> dict:
    s = summary.scheduling
    workers = [w for w in summary.per_worker.values() if w.rows]
    alive = sum(w.alive_s for w in workers)
    lease = sum(w.lease_wait_s for w in workers)
    idle = sum(w.idle_s for w in workers)
    shards = max(s.shards_written, 1)
    coordinator = s.lease_s + s.complete_s
    shard_mean = s.shard_s / shards
    return {
        # workers that did any rows: a short job can end before a late one has started
        "nodes": n, "workers": len(workers), "rows": summary.rows, "generated_tokens": summary.generated_tokens,
        "cluster_start_s": cluster_s, "job_s": summary.wall_s, "processing_s": summary.processing_s,
        "tokens_per_s": summary.generated_tokens / summary.processing_s,
        "rows_per_s": summary.rows / summary.processing_s,
        "worker_s": alive, "worker_lease_s": lease, "worker_idle_s": idle,
        "worker_wait_fraction": (lease + idle) / alive if alive else 0.0,
        "shards": s.shards_written, "pieces_leased": s.pieces_leased, "shard_mean_s": shard_mean,
        "coordinator_s": coordinator, "coordinator_write_s": s.write_s,
        "coordinator_ms_per_shard": 1e3 * coordinator / shards,
        "worker_lease_ms_per_shard": 1e3 * lease / shards,
        "overhead_per_shard": (coordinator + lease) / shards / shard_mean if shard_mean else 0.0,
    }


def print_run(r: dict, header: bool = False) -> None:
    if header:
        print(f"{'nodes':>5}{'workers':>8}{'job s':>8}{'proc s':>8}{'tokens/s':>10}{'speed-up':>9}"
              f"{'wait lease':>11}{'wait idle':>10}{'shard s':>9}{'coord ms':>9}{'lease ms':>9}{'overhead':>9}")
    print(f"{r['nodes']:>5}{r['workers']:>8}{r['job_s']:8.1f}{r['processing_s']:8.1f}{r['tokens_per_s']:10.1f}"
          f"{r['speedup']:8.2f}x{100 * r['worker_lease_s'] / max(r['worker_s'], 1e-9):10.2f}%"
          f"{100 * r['worker_idle_s'] / max(r['worker_s'], 1e-9):9.2f}%{r['shard_mean_s']:9.2f}"
          f"{r['coordinator_ms_per_shard']:9.2f}{r['worker_lease_ms_per_shard']:9.2f}"
          f"{100 * r['overhead_per_shard']:8.2f}%", flush=True)


def print_legend() -> None:
    print("proc s: first shard handed out to last shard written; tokens/s: generated tokens / proc s; "
          "wait lease / idle: share of the workers' time spent in lease calls / idle with nothing to run; "
          "shard s: mean time from a shard's first lease to its part file; coord ms: coordinator time per shard "
          "(leasing and writing); lease ms: worker time in lease calls per shard; overhead: (coord + lease) / "
          "shard s.")


def coordinator_capacity(shards: int = 4000, shard_rows: int = 16, text_tokens: int = 64,
                         sample: int = 200) -> dict:
    """The coordinator alone, in this process, on a synthetic job: lease and complete every shard as fast
    as possible (results of `text_tokens` tokens), timing the first and the last `sample` shards. The
    manifest grows with the shards written (it is rewritten whole, at most 10% of the time), so compare
    the two."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ternpool.engine.requests import Result
    from ternpool.jobs import JobSpec, Manifest, open_inputs, plan_shards

    from .coordinator import DONE, Coordinator

    rows = shards * shard_rows
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.parquet"
        # pyarrow's default row groups (a million rows), as most prompt files have
        pq.write_table(pa.table({"prompt": [f"prompt number {i} about the river, the mill and the bread"
                                            for i in range(rows)]}), src)
        spec = JobSpec(inputs=str(src), output=str(Path(tmp) / "out"), model="synthetic", shard_rows=shard_rows)
        inputs = open_inputs(spec.inputs)
        plan = plan_shards(inputs, shard_rows)
        coord = Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, "synthetic"), 2)
        coord.register("w", "node")
        text = " word" * text_tokens
        times = []
        while True:
            t0 = time.perf_counter()
            lease = coord.lease("w")
            if lease == DONE:
                break
            key, table = lease
            results = [Result(i, text, tuple(range(text_tokens)), 8, text_tokens, "length")
                       for i in table.column("row_index").to_pylist()]
            coord.complete("w", key, results)
            times.append(time.perf_counter() - t0)
        manifest_bytes = (Path(spec.output) / "_manifest.json").stat().st_size
    first, last = times[:sample], times[-sample:]
    return {"shards": len(times), "shard_rows": shard_rows, "first_ms": 1e3 * sum(first) / len(first),
            "last_ms": 1e3 * sum(last) / len(last), "manifest_bytes": manifest_bytes,
            "shards_per_s_last": len(last) / sum(last)}
