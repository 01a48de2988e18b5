"""Where the start-up of a small job on the embedded cluster goes: one tiny job, timed phase by phase.

    python tests/tools/startup_time.py                 # ternpool's embedded cluster as it starts now
    python tests/tools/startup_time.py --compare --repeat 3   # both, alternating, medians of 3 runs each

Phases (seconds from the start of each run): ray.init, the coordinator actor ready (its metrics
endpoint answers), the worker actor ready (Engine.load and the warm-up generation done: it has
registered), the first shard written, the job's end, and ray.shutdown. `--ray-defaults` starts
the embedded cluster the way ternpool did before its start-up cuts (see `ray_env.connect(lean=False)`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _time_job(model: str, work: Path, lean: bool, rows: int) -> dict[str, float]:
    import ray

    from ternpool.cluster.driver import PoolConfig, submit
    from ternpool.cluster.ray_env import connect

    src = work / "prompts.parquet"
    if not src.exists():
        pq.write_table(pa.table({"prompt": [f"story {i}" for i in range(rows)]}), src)
    out = work / f"out-{'lean' if lean else 'defaults'}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    connect(None, lean=lean)  # the job below joins this cluster instead of starting its own
    marks["ray.init"] = time.perf_counter() - t0
    try:
        handle = submit(str(src), model, str(out), max_tokens=8, shard_rows=10,
                        pool=PoolConfig(slots=4, metrics_port=0))
        marks["coordinator ready"] = time.perf_counter() - t0
        while not handle._done.is_set():
            try:
                s = handle.progress()
            except Exception:  # the job is ending: its coordinator is gone
                continue
            now = time.perf_counter() - t0
            if s["active_workers"] and "worker ready" not in marks:
                marks["worker ready"] = now
            if s["rows_done"] and "first shard" not in marks:
                marks["first shard"] = now
            time.sleep(0.02)
        summary = handle.wait()
        marks["job end"] = time.perf_counter() - t0
        assert summary.state == "finished", summary
    finally:
        ray.shutdown()
    marks["shutdown"] = time.perf_counter() - t0
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ray-defaults", action="store_true", help="start the cluster without ternpool's cuts")
    p.add_argument("--compare", action="store_true", help="both, alternating, in this run")
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the table shows medians")
    p.add_argument("--rows", type=int, default=40)
    args = p.parse_args()
    from ternpool.engine.modelgen import make_model

    work = Path(tempfile.mkdtemp(prefix="ternpool-startup-"))
    model = str(make_model(work / "model", "tiny"))
    kinds = [True, False] if args.compare else [not args.ray_defaults]
    runs: dict[bool, list] = {lean: [] for lean in kinds}
    for i in range(args.repeat):
        for lean in (kinds if i % 2 == 0 else kinds[::-1]):  # alternate who goes first (cold caches)
            runs[lean].append(_time_job(model, work, lean, args.rows))
    names = list(runs[kinds[0]][0])
    header = "".join(f"{'ternpool' if lean else 'ray defaults':>14}" for lean in kinds)
    print(f"{'phase (s from start)':<22}{header}   (median of {args.repeat})")
    for name in names:
        print(f"{name:<22}" + "".join(f"{statistics.median(r[name] for r in runs[lean] if name in r):>14.2f}"
                                      for lean in kinds))


if __name__ == "__main__":
    main()
