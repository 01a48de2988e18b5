"""One run per OUT with real `ternpool submit` processes; refused jobs leave OUT as it was; a failed
job's error reaches `status`."""

from __future__ import annotations

import json
import subprocess

import pytest

from ternpool.cluster.driver import JobHandle, PoolConfig, prepare, submit
from ternpool.engine import EngineConfig, SamplingParams
from ternpool.jobs import JobInputError, JobSpec, read_output, status

from faulty_worker import faulty  # tests/cluster/faulty_worker.py
from helpers import CLI, run_cli, snapshot, wait_until, write_prompts

pytestmark = pytest.mark.cluster


def test_a_second_submit_on_the_same_output_exits_at_once_and_the_first_runs_on(tmp_path, tiny_model,
                                                                                  make_prompts):
    src = tmp_path / "prompts.parquet"
    make_prompts(src, 2000, seed=7)
    out = tmp_path / "out"
    cmd = [*CLI, "submit", str(src), "--model", tiny_model, "--output",
           str(out), "--max-tokens", "24", "--shard-rows", "20", "--threads-per-worker", "1", "--no-progress",
           "--metrics-port", "-1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until((out / "_manifest.json").exists, 180, "OUT/_manifest.json")  # created under the first run's lock
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is being written by another ternpool run, pid {first.pid} on host " in second.stderr
        assert f"ternpool cancel {out}" in second.stderr
        assert "shards to run" not in second.stdout  # it never started a job
        assert "Started a local Ray instance" not in second.stderr  # nor a Ray cluster
        st = json.loads(run_cli("status", str(out), "--json").stdout)
        assert st["driver"]["pid"] == first.pid  # the winner's
        run_cli("cancel", str(out))
        stdout, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode in (0, 130), stdout
    st = json.loads(run_cli("status", str(out), "--json").stdout)
    assert st["state"] in ("cancelled", "finished") and st["driver"] is None
    done = read_output(str(out))  # only the first run's rows, each once
    assert done.num_rows == st["rows_done"] and len(set(done.column("row_index").to_pylist())) == done.num_rows


def test_a_job_refused_for_memory_leaves_out_as_it_was(tmp_path, tiny_model):
    import ray

    src = write_prompts(tmp_path / "p.parquet", ["a", "b", "c"])
    empty = tmp_path / "empty"
    empty.mkdir()
    resumable = tmp_path / "resumable"
    plan = prepare(JobSpec(str(src), str(resumable), tiny_model))
    plan.manifest.create()
    ray.init(address="local", num_cpus=1, object_store_memory=100 * 1024 ** 2, logging_level="WARNING")
    try:
        for out in (tmp_path / "absent", empty, resumable):
            before = snapshot(out)
            with pytest.raises(JobInputError, match="does not fit node"):
                submit(str(src), tiny_model, str(out), pool=PoolConfig(engine=EngineConfig(slots=1_000_000)))
            assert snapshot(out) == before, out
    finally:
        ray.shutdown()


def test_a_failed_job_shows_failed_and_its_error_in_status(tmp_path, tiny_model):
    src = write_prompts(tmp_path / "p.parquet", ["POISON"] + [f"prompt {i}" for i in range(7)])
    out = tmp_path / "out"
    handle = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=4), shard_rows=4,
                    pool=PoolConfig(engine=EngineConfig(slots=2), max_worker_restarts=0),
                    worker_cls=faulty(exit_on_prompt="POISON"))
    assert isinstance(handle, JobHandle)
    with pytest.raises(RuntimeError, match="worker losses: giving up"):
        handle.wait(timeout=600)
    st = status(str(out))
    assert st["state"] == "failed" and "worker losses: giving up" in st["error"]
    assert st["driver"] is None
