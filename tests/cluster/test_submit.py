"""Batch jobs end to end: embedded cluster, multi-node cluster, faults, resume."""

from __future__ import annotations

import os
import signal
import subprocess

import pyarrow.parquet as pq
import pytest

from ternpool.cluster.driver import PoolConfig, submit
from ternpool.engine import Engine, EngineConfig, Request, SamplingParams
from ternpool.jobs import read_output

from faulty_worker import faulty  # tests/cluster/faulty_worker.py
from helpers import CLI, completed_shards, run_cli, wait_until, write_prompts

pytestmark = pytest.mark.cluster


def _check_exactly_once(out, rows: int, bad: dict):
    table = read_output(str(out))
    assert table.num_rows == rows
    assert table.column("row_index").to_pylist() == list(range(rows))
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(rows)]
    errors = {i: e for i, e in enumerate(table.column("error").to_pylist()) if e is not None}
    assert set(errors) == set(bad), errors
    assert all(f == ("error" if i in bad else f) for i, f in enumerate(table.column("finish_reason").to_pylist()))
    return table


def test_end_to_end_on_the_embedded_cluster(tmp_path, tiny_model, make_prompts):
    src = tmp_path / "prompts.parquet"
    bad = make_prompts(src, 300)
    out = tmp_path / "out"
    handle = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=10), shard_rows=40,
                    pool=PoolConfig(engine=EngineConfig(slots=8, threads=1)))
    summary = handle.wait(timeout=600)
    assert summary.state == "finished" and summary.rows == 300 and summary.failed_rows == len(bad)
    table = _check_exactly_once(out, 300, bad)
    assert table.column_names[:2] == ["row_index", "id"]
    assert table.column_names == ["row_index", "id", "meta", "generated_text", "finish_reason", "prompt_tokens",
                                  "completion_tokens", "error", "generated_logprobs",
                                  "prompt_token_logprobs"]  # prompt and sampling columns do not pass through
    assert table.column("meta").to_pylist()[7] == {"n": 7, "tag": "t1"}
    assert summary.generated_tokens == sum(table.column("completion_tokens").to_pylist())

    # greedy rows equal the engine run directly on the same prompts
    inputs = pq.read_table(src).to_pylist()
    rows = [dict(r, **inputs[r["row_index"]]) for r in table.to_pylist()]
    greedy = [r for r in rows if r["error"] is None and r["temperature"] is None][:40]
    engine = Engine.load(tiny_model, slots=4)
    direct = engine.generate([Request(r["row_index"], prompt=r["prompt"], params=SamplingParams(
        max_tokens=r["max_tokens"] or 10, seed=r["seed"])) for r in greedy])
    assert [d.text for d in direct] == [r["generated_text"] for r in greedy]
    assert [d.completion_tokens for d in direct] == [r["completion_tokens"] for r in greedy]

    # rerunning the same job finds nothing to do and duplicates nothing
    again = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=10), shard_rows=40,
                   pool=PoolConfig(engine=EngineConfig(threads=1))).wait(timeout=300)
    assert again.state == "finished"
    assert read_output(str(out)).num_rows == 300


def test_multi_node_spread_worker_kill_and_node_loss(tmp_path, tiny_model, make_prompts, ray_cluster):
    cluster, nodes = ray_cluster
    src = tmp_path / "prompts.parquet"
    bad = make_prompts(src, 240, seed=1)
    out = tmp_path / "out"
    handle = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=24), shard_rows=10,
                    pool=PoolConfig(engine=EngineConfig(slots=4), hang_timeout=60),
                    worker_cls=faulty(step_delay=0.02))  # slow nodes
    wait_until(lambda: handle.progress().rows_done >= 30, 120, "30 rows done")
    # kill one worker process mid-shard
    victim = next(iter(handle.workers.values()))
    import ray

    info = ray.get(victim.info.remote(), timeout=30)
    pid = info["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: handle.progress().rows_done >= 120, 120, "120 rows done")
    assert handle.progress().rows_done < 200, "the job must still be running when the node goes"
    doomed = next(n for n in nodes if n.node_id != info["node"])  # a node whose worker is still the first one
    cluster.remove_node(doomed, allow_graceful=False)  # lose a whole node
    summary = handle.wait(timeout=600)
    assert summary.state == "finished", summary
    assert summary.worker_restarts >= 2 and summary.retries >= 1
    _check_exactly_once(out, 240, bad)
    busy = [w for w in summary.per_worker.values() if w.rows > 0]
    assert len({w.node for w in busy}) >= 2  # work spread over nodes


def test_poison_row_is_isolated_and_hung_worker_is_replaced(tmp_path, tiny_model, ray_cluster):
    src = tmp_path / "prompts.parquet"
    prompts = [f"prompt number {i}" for i in range(48)]
    prompts[13] = "POISON"
    prompts[30] = "HANG"
    import pyarrow as pa

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(48)], "prompt": prompts}), src)
    out = tmp_path / "out"
    handle = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=6), shard_rows=8, max_retries=1,
                    pool=PoolConfig(engine=EngineConfig(slots=4), hang_timeout=4, max_worker_restarts=40),
                    worker_cls=faulty(exit_on_prompt="POISON", hang_on_prompt="HANG"))
    summary = handle.wait(timeout=900)
    assert summary.state == "finished"
    table = read_output(str(out))
    assert table.column("row_index").to_pylist() == list(range(48))
    errors = {i: e for i, e in enumerate(table.column("error").to_pylist()) if e is not None}
    assert set(errors) == {13, 30}
    assert "worker was lost" in errors[13]


def test_driver_killed_mid_job_then_rerun_resumes(tmp_path, tiny_model, make_prompts):
    src = tmp_path / "prompts.parquet"
    bad = make_prompts(src, 400, seed=2)
    out = tmp_path / "out"
    cmd = [*CLI, "submit", str(src), "--model", tiny_model,
           "--output", str(out), "--max-tokens", "16", "--shard-rows", "20", "--threads-per-worker", "1",
           "--no-progress", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: completed_shards(out) >= 3, 180, "3 shards completed")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded cluster it started
    proc.wait()
    done_before = completed_shards(out)
    assert 3 <= done_before < 20
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # the killed driver's actors may finish a few more shards before Ray reaps them; either way the
    # rerun completes the job
    assert "finished" in rerun.stdout or "nothing to do" in rerun.stdout, rerun.stdout
    _check_exactly_once(out, 400, bad)


def test_cancel_from_another_shell_keeps_completed_shards_and_status_reads_them(tmp_path, tiny_model,
                                                                                  make_prompts):
    import json

    src = tmp_path / "prompts.parquet"
    make_prompts(src, 3000, seed=3)  # long enough that the cancel lands mid-job
    out = tmp_path / "out"
    cmd = [*CLI, "submit", str(src), "--model", tiny_model, "--output",
           str(out), "--max-tokens", "24", "--shard-rows", "20", "--threads-per-worker", "1", "--no-progress", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: completed_shards(out) >= 2, 180, "2 shards completed")
    assert "cancel requested" in run_cli("cancel", str(out)).stdout
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "cancelled" in stdout
    status = json.loads(run_cli("status", str(out), "--json").stdout)
    assert status["state"] == "cancelled" and 40 <= status["rows_done"] < 3000 and status["rows_total"] == 3000
    done = read_output(str(out))
    assert done.num_rows == status["rows_done"] and len(set(done.column("row_index").to_pylist())) == done.num_rows
    assert not (out / "_cancel").exists()


def test_nodes_that_join_get_workers(tmp_path, tiny_model, make_prompts):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * 1024 ** 2})
    cluster.add_node(num_cpus=1, object_store_memory=150 * 1024 ** 2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        import pyarrow as pa

        src = tmp_path / "prompts.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(400)],
                                 "prompt": [f"story {i} of the river" for i in range(400)]}), src)
        handle = submit(str(src), tiny_model, str(tmp_path / "out"), sampling=SamplingParams(max_tokens=32),
                        shard_rows=5, pool=PoolConfig(engine=EngineConfig(slots=4)),
                        worker_cls=faulty(step_delay=0.01))  # ~30 s for one worker
        wait_until(lambda: handle.progress().rows_done >= 10, 120, "10 rows done")
        cluster.add_node(num_cpus=1, object_store_memory=150 * 1024 ** 2)
        summary = handle.wait(timeout=600)
        assert summary.state == "finished"
        assert len({w.node for w in summary.per_worker.values() if w.rows > 0}) == 2
        _check_exactly_once(tmp_path / "out", 400, {})
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_bad_jobs_fail_before_compute_with_named_errors(tmp_path, tiny_model):
    import pyarrow as pa

    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), src)
    r = run_cli("submit", str(src), "--model", tiny_model, "--output", str(tmp_path / "out"))
    assert r.returncode == 2 and "p.parquet" in r.stderr and "prompt" in r.stderr
    assert not (tmp_path / "out" / "_manifest.json").exists()
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    r = run_cli("submit", str(tmp_path / "corrupt.parquet"), "--model", tiny_model, "--output", str(tmp_path / "o2"))
    assert r.returncode == 2 and "corrupt.parquet" in r.stderr
    good = write_prompts(tmp_path / "good.parquet", ["a", "b", "c"], id=[1, 2, 3])
    r = run_cli("submit", str(good), "--model", str(tmp_path / "nomodel"), "--output", str(tmp_path / "o3"))
    assert r.returncode == 2 and "nomodel" in r.stderr
    assert not (tmp_path / "o3" / "_manifest.json").exists()
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o4"), "--dry-run")
    assert r.returncode == 0 and "3 rows" in r.stdout and "shards:  1" in r.stdout, r.stdout
    # the dry run judges every node with submit's own check (it connects to Ray to see them)
    assert len([ln for ln in r.stdout.splitlines() if ln.startswith("node ") and ": fits: " in ln]) == 1, r.stdout
    # and estimates the job from a calibration of the model on this node
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o4"), "--dry-run",
                "--node-price", "0.4", "--max-tokens", "5")
    assert r.returncode == 0 and "estimate: 3 rows, ~" in r.stdout and "at most 15 generated tokens" in r.stdout
    assert " at $0.4 a node-hour" in r.stdout and not (tmp_path / "o4").exists(), r.stdout
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o4"), "--node-price", "-1")
    assert r.returncode == 2 and "--node-price: expected dollars per node-hour" in r.stderr, r.stderr
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o6"), "--dry-run",
             "--slots", "1000000")
    assert r.returncode == 2 and ": does not fit: one worker needs" in r.stdout and "Would fit: --slots" in r.stdout
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o7"), "--dry-run",
             "--max-context", "100000")
    assert r.returncode == 2 and "max context 100000" in r.stderr and "max_position_embeddings 2048" in r.stderr
    # more KV cache than any node has: refused before a worker starts, saying what would fit
    r = run_cli("submit", str(good), "--model", tiny_model, "--output", str(tmp_path / "o5"), "--slots", "1000000",
             "--metrics-port", "-1", "--no-progress")
    assert r.returncode == 2 and "does not fit node" in r.stderr and "1000000 slots x 2048 tokens" in r.stderr, r.stderr
    assert "Would fit: --slots" in r.stderr


def test_ctrl_c_in_the_submitting_shell_cancels_and_rerun_resumes(tmp_path, tiny_model, make_prompts):
    import json

    src = tmp_path / "prompts.parquet"
    bad = make_prompts(src, 2000, seed=5)
    out = tmp_path / "out"
    cmd = [*CLI, "submit", str(src), "--model", tiny_model, "--output",
           str(out), "--max-tokens", "48", "--shard-rows", "20", "--no-progress", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_until(lambda: completed_shards(out) >= 2, 180, "2 shards completed")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground process group on Ctrl-C
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "cancelled" in stdout
    done = len(json.loads((out / "_manifest.json").read_text())["completed"])
    assert 2 <= done < 100
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "finished" in rerun.stdout, rerun.stdout + rerun.stderr
    _check_exactly_once(out, 2000, bad)


def test_embedded_cluster_object_store_is_capped():
    import ray

    from ternpool.cluster.ray_env import connect

    assert connect(None, object_store_memory=96 * 1024 ** 2)
    try:
        assert ray.cluster_resources()["object_store_memory"] == pytest.approx(96 * 1024 ** 2, rel=0.01)
    finally:
        ray.shutdown()
