"""The coordinator without Ray: its scheduling-overhead counts, the metrics they feed, and the
manifest saves it batches (a crash loses at most the unsaved records, never a row)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ternpool.cluster import coordinator as coordinator_mod
from ternpool.cluster.bench_cluster import coordinator_capacity
from ternpool.cluster.coordinator import DONE, Coordinator
from ternpool.engine.requests import Result
from ternpool.jobs import Manifest, read_output
from ternpool.jobs.output import write_part as real_write_part
from ternpool.jobs.runlock import OutputLock

from helpers import make_job, run_one_shard

pytestmark = pytest.mark.unit


def _coordinator(tmp_path, rows=24, shard_rows=4) -> Coordinator:
    # a second coordinator on the same job sees the same file
    spec, inputs, plan = make_job(tmp_path, rows, src=tmp_path / "p.parquet", row_group_size=shard_rows,
                                  shard_rows=shard_rows)
    return Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, {"m": 1}), 2)


def _finish_one(coord: Coordinator, worker="w", waits=None) -> bool:
    lease = coord.lease(worker)
    if lease == DONE:
        return False
    key, table = lease
    results = [Result(i, f"text {i}", (1, 2), 3, 2, "length", cached_tokens=1) for i in table.column("row_index").to_pylist()]
    assert coord.complete(worker, key, results, waits)
    return True


def _on_disk(tmp_path) -> set[int]:
    return {int(k) for k in json.loads((tmp_path / "out" / "_manifest.json").read_text())["completed"]}


def test_scheduling_counts_and_worker_waits_reach_stats_and_metrics(tmp_path):
    coord = _coordinator(tmp_path)
    coord.register("w", "node-a", slots=4, model_bytes=10)
    _finish_one(coord, waits=(0.25, 0.5))
    coord.heartbeat("w", running=2, waits=(0.75, 1.0))
    coord.heartbeat("w", running=2, waits=(0.5, 0.5))  # running totals never go back
    while _finish_one(coord):
        pass
    s = coord.stats()
    sched = s.scheduling
    assert sched.shards_written == sched.pieces_leased == 6
    assert 0 < sched.write_s <= sched.complete_s and sched.lease_s > 0
    assert sched.shard_s > 0
    w = s.workers["w"]
    assert (w.lease_wait_s, w.idle_s) == (0.75, 1.0)
    assert w.alive_s > 0 and w.rows == 24
    text = coord.metrics.exposition().decode()
    wait = [ln for ln in text.splitlines() if ln.startswith("ternpool_worker_wait_seconds_total{")]
    assert len(wait) == 1 and 'worker="w"' in wait[0] and float(wait[0].split()[-1]) == 1.75
    busy = [ln for ln in text.splitlines() if ln.startswith("ternpool_coordinator_busy_seconds_total{")]
    assert float(busy[0].split()[-1]) == pytest.approx(sched.lease_s + sched.complete_s)


def test_manifest_saves_are_batched_and_a_crash_only_redoes_unsaved_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "MANIFEST_SAVE_S", 3600.0)
    coord = _coordinator(tmp_path)
    assert _finish_one(coord)  # the first completion saves (nothing saved yet)
    assert _on_disk(tmp_path) == {0}
    for _ in range(3):
        _finish_one(coord)
    assert _on_disk(tmp_path) == {0}  # three part files written, their records not yet saved
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 4
    coord.write_progress("running")  # within the interval: still not saved
    assert _on_disk(tmp_path) == {0}

    # the coordinator dies here; a new run of the same job resumes from what was saved
    again = _coordinator(tmp_path)
    assert sorted(p.shard.shard_id for p in again.queue) == [1, 2, 3, 4, 5]
    while _finish_one(again):
        pass
    assert _on_disk(tmp_path) == set(range(6))  # the last shard saves at once
    again.write_progress("finished")
    data = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert data["finished"] is not None
    table = read_output(str(tmp_path / "out"))
    assert table.column("row_index").to_pylist() == list(range(24))


def test_unsaved_records_are_saved_when_the_interval_passes_or_the_job_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "MANIFEST_SAVE_S", 3600.0)
    coord = _coordinator(tmp_path)
    _finish_one(coord)
    _finish_one(coord)
    assert _on_disk(tmp_path) == {0}
    monkeypatch.setattr(coordinator_mod, "MANIFEST_SAVE_S", 0.0)
    coord._save_s = 1.0  # the last save took 1 s: the next waits 10 s, so saving stays under 10% of the time
    coord.write_progress("running")
    assert _on_disk(tmp_path) == {0}
    coord._save_s = 0.0
    coord.write_progress("running")  # the supervisor's once-a-second call saves what is pending
    assert _on_disk(tmp_path) == {0, 1}
    monkeypatch.setattr(coordinator_mod, "MANIFEST_SAVE_S", 3600.0)
    _finish_one(coord)
    coord.cancel()
    coord.write_progress("cancelled")
    assert _on_disk(tmp_path) == {0, 1, 2}


def test_coordinator_capacity_runs_every_shard():
    c = coordinator_capacity(shards=60, shard_rows=4, sample=20)
    assert c["shards"] == 60 and c["shard_rows"] == 4
    assert 0 < c["first_ms"] and 0 < c["last_ms"] and c["shards_per_s_last"] > 0
    assert c["manifest_bytes"] > 60 * 20


def test_the_first_completion_saves_even_when_the_machine_booted_a_minute_ago(tmp_path, monkeypatch):
    # time.monotonic counts from boot: "never saved" must not look like "saved at boot"
    monkeypatch.setattr(coordinator_mod, "MANIFEST_SAVE_S", 3600.0)
    clock = iter(range(10, 10_000))
    monkeypatch.setattr(coordinator_mod.time, "monotonic", lambda: float(next(clock)))
    coord = _coordinator(tmp_path)
    assert _finish_one(coord)
    assert _on_disk(tmp_path) == {0}
    _finish_one(coord)
    assert _on_disk(tmp_path) == {0}  # the second waits for the interval


def _full_disk(fails):
    """A write_part that raises ENOSPC while `fails(shard_id)` says so, and counts the parts it wrote."""
    written: list[int] = []

    def write_part(output, shard_id, table):
        if fails(shard_id):
            raise OSError(28, "No space left on device", f"{output}/part-{shard_id:05d}.parquet")
        written.append(shard_id)
        return real_write_part(output, shard_id, table)

    return write_part, written


def test_a_part_write_that_fails_a_few_times_keeps_the_results_and_writes_the_part_once(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "WRITE_BACKOFF_S", 0.0)
    tries = {"n": 0}

    def fails(shard_id):
        if shard_id != 0:
            return False
        tries["n"] += 1
        return tries["n"] <= 3  # three failures, then it works

    write_part, written = _full_disk(fails)
    monkeypatch.setattr(coordinator_mod, "write_part", write_part)
    coord = _coordinator(tmp_path)
    assert _finish_one(coord)  # the worker's call returns normally: nothing is raised at it
    assert len(coord.partial[0]) == 4 and not (tmp_path / "out" / "part-00000.parquet").exists()
    assert coord.stats().error is None  # second try (fails)
    assert coord.stats().error is None  # third try (fails)
    s = coord.stats()  # fourth try: written
    assert s.error is None and s.shards_done == 1 and 0 not in coord.partial
    while _finish_one(coord):
        pass
    assert coord.stats().done
    assert written == [0, 1, 2, 3, 4, 5]  # each part written once
    assert _on_disk(tmp_path) == set(range(6))
    assert read_output(str(tmp_path / "out")).column("row_index").to_pylist() == list(range(24))


def test_a_part_write_that_keeps_failing_fails_the_job_with_the_os_error_and_keeps_written_shards(
        tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "WRITE_BACKOFF_S", 0.0)
    write_part, written = _full_disk(lambda shard_id: shard_id >= 2)  # the disk fills up after two shards
    monkeypatch.setattr(coordinator_mod, "write_part", write_part)
    coord = _coordinator(tmp_path)
    for _ in range(3):
        _finish_one(coord)
    for _ in range(coordinator_mod.WRITE_ATTEMPTS - 2):
        assert coord.stats().error is None
    s = coord.stats()
    assert s.error.startswith("OSError: [Errno 28] No space left on device:")
    assert "part-00002.parquet" in s.error
    assert not s.done and coord.lease("w") == DONE  # workers stop
    coord.write_progress("failed")
    progress = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert progress["state"] == "failed" and progress["error"] == s.error
    assert _on_disk(tmp_path) == {0, 1} and written == [0, 1]
    assert len(coord.partial[2]) == 4  # the failed shard's results were never dropped

    monkeypatch.setattr(coordinator_mod, "write_part", _full_disk(lambda shard_id: False)[0])
    again = _coordinator(tmp_path)  # a rerun with space
    while _finish_one(again):
        pass
    assert again.stats().done
    assert read_output(str(tmp_path / "out")).column("row_index").to_pylist() == list(range(24))


def test_a_manifest_save_that_fails_is_retried_and_then_fails_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator_mod, "WRITE_BACKOFF_S", 0.0)
    coord = _coordinator(tmp_path, rows=8)
    real_save, calls = coord.manifest.save, {"n": 0}

    def save():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(5, "Input/output error", str(tmp_path / "out" / "_manifest.json"))
        real_save()

    monkeypatch.setattr(coord.manifest, "save", save)
    _finish_one(coord)
    _finish_one(coord)  # the last shard: its save fails, so the job is not done yet
    assert coord.stats().done is False  # second try fails
    s = coord.stats()  # third try saves
    assert s.done and s.error is None and _on_disk(tmp_path) == {0, 1}

    (tmp_path / "b").mkdir()
    again = _coordinator(tmp_path / "b", rows=8)

    def broken():
        raise OSError(5, "Input/output error", str(tmp_path / "b" / "out" / "_manifest.json"))

    monkeypatch.setattr(again.manifest, "save", broken)
    _finish_one(again)
    for _ in range(coordinator_mod.WRITE_ATTEMPTS):
        s = again.stats()
    assert s.error.startswith("OSError: [Errno 5] Input/output error:") and not s.done
    assert again.lease("w") == DONE


def test_failed_rows_tokens_are_not_counted(tmp_path, tiny_engine):
    from ternpool.engine import Engine
    from ternpool.engine.model import BitNetModel

    engine = Engine(BitNetModel(tiny_engine.model.weights, slots=2, max_context=32), tiny_engine.tokenizer,
                    tiny_engine.threads)
    coord, _, spec = run_one_shard(tmp_path, {"prompt": ["Hello", "word " * 100, "World", "Bye"],
                                                "max_tokens": pa.array([3, None, 0, 2], pa.int64())}, engine)
    out = read_output(spec.output).to_pydict()
    assert [e is None for e in out["error"]] == [True, False, False, True]
    assert "too long" in out["error"][1] and out["prompt_tokens"][1] > 32  # the output keeps the count
    good_prompt = out["prompt_tokens"][0] + out["prompt_tokens"][3]
    good_generated = out["completion_tokens"][0] + out["completion_tokens"][3]
    assert good_prompt > 0 and good_generated == 5
    s = coord.stats()
    assert (s.prompt_tokens, s.generated_tokens) == (good_prompt, good_generated)
    assert (s.workers["w"].prompt_tokens, s.workers["w"].generated_tokens) == (good_prompt, 5)
    text = coord.metrics.exposition().decode()
    prompt_metric = [ln for ln in text.splitlines() if ln.startswith("ternpool_prompt_tokens_total{")]
    assert len(prompt_metric) == 1 and float(prompt_metric[0].split()[-1]) == good_prompt


def test_resumed_summary_counts_the_whole_job_and_agrees_with_status(tmp_path, capsys):
    from ternpool.cluster.cli.jobs import print_summary
    from ternpool.cluster.stats import summarize
    from ternpool.jobs import status

    first = _coordinator(tmp_path)
    _finish_one(first)
    _finish_one(first)
    first.cancel()
    first.write_progress("cancelled")
    entries = json.loads((tmp_path / "out" / "_manifest.json").read_text())["completed"]
    assert all((e["prompt_tokens"], e["generated_tokens"]) == (12, 8) for e in entries.values())  # 4 rows x (3, 2)

    again = _coordinator(tmp_path)
    while _finish_one(again):
        pass
    stats = again.write_progress("finished")
    summary = summarize(str(tmp_path / "out"), stats.job_id, "finished", stats, wall_s=99.0)
    assert (summary.rows, summary.rows_this_run, summary.resumed) == (24, 16, True)
    assert (summary.prompt_tokens, summary.generated_tokens) == (72, 48)
    assert (summary.prompt_tokens_this_run, summary.generated_tokens_this_run) == (48, 32)
    assert summary.tokens_per_s == pytest.approx(32 / stats.processing_s) and stats.processing_s > 0
    st = status(str(tmp_path / "out"))
    assert st["state"] == "finished" and st["tokens_per_s"] == summary.tokens_per_s and st["eta_s"] == 0.0
    print_summary(summary)
    line = capsys.readouterr().out.splitlines()[0]
    assert "24 rows (16 in this run), 0 failed; 72 prompt + 48 generated tokens (48 + 32 in this run); " \
           f"{summary.tokens_per_s:.1f} tokens/s" in line


def test_eta_is_remaining_rows_over_the_recent_row_rate(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from ternpool.cluster import metrics as metrics_mod
    from ternpool.cluster.cli.jobs import cmd_status
    from ternpool.jobs import status

    clock = [100.0]
    monkeypatch.setattr(metrics_mod, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    coord = _coordinator(tmp_path)  # 24 rows in shards of 4
    _finish_one(coord)
    assert coord.stats().eta_s is None  # one sample: no rate yet
    clock[0] = 110.0
    _finish_one(coord)
    s = coord.write_progress("running")
    assert s.eta_s == pytest.approx((24 - 8) * 10.0 / 4)  # 4 rows in 10 s, 16 to go
    lock = OutputLock(str(tmp_path / "out"))  # "running" needs a live driver holding OUT
    lock.acquire()
    try:
        st = status(str(tmp_path / "out"))
        assert st["state"] == "running" and st["eta_s"] == pytest.approx(40.0)
        cmd_status(SimpleNamespace(output=str(tmp_path / "out"), json=False))
    finally:
        lock.release()
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert "running; " in line and line.endswith(", ETA 40 s"), line


def test_progress_file_holds_every_count_of_the_typed_stats(tmp_path):
    """`stats()` is a JobStats; OUT/_progress.json keeps the keys `status` and other shells read."""
    from ternpool.cluster.stats import JobStats, SchedulingStats, WorkerStats

    coord = _coordinator(tmp_path)
    coord.register("w", "node-a")
    _finish_one(coord)
    s = coord.write_progress("running")
    assert isinstance(s, JobStats) and isinstance(s.scheduling, SchedulingStats)
    assert isinstance(s.workers["w"], WorkerStats) and s.workers["w"].node == "node-a"
    progress = json.loads((tmp_path / "out" / "_progress.json").read_text())
    assert set(progress) == {
        "job_id", "rows_total", "rows_done", "rows_done_this_run", "failed_rows", "shards_total", "shards_done",
        "queued", "in_flight", "retries", "prompt_tokens", "generated_tokens", "job_prompt_tokens",
        "job_generated_tokens", "tokens_per_s", "eta_s", "elapsed_s", "processing_s", "done", "error", "cancelled",
        "active_workers", "scheduling", "workers", "state", "updated", "metrics_port", "node_price", "cost",
        "cached_tokens", "job_cached_tokens"}
    assert set(progress["scheduling"]) == {"lease_s", "complete_s", "write_s", "shards_written", "shard_s",
                                           "pieces_leased"}
    assert progress["workers"]["w"] == {"node": "node-a", "rows": 4, "prompt_tokens": 12, "generated_tokens": 8,
                                        "leased": 0, "lost": False, "lease_wait_s": 0.0, "idle_s": 0.0,
                                        "alive_s": progress["workers"]["w"]["alive_s"], "core_s": 0.0,
                                        "cached_tokens": 4}
    assert (progress["cached_tokens"], progress["job_cached_tokens"]) == (4, 4)
    assert (progress["state"], progress["rows_done"], progress["shards_done"]) == ("running", 4, 1)
    assert progress["tokens_per_s"] == s.tokens_per_s > 0


def test_stats_from_the_manifest_alone_count_the_completed_shards(tmp_path):
    """What the driver reports when the coordinator is gone at the end of a job."""
    from ternpool.cluster.stats import JobStats, summarize

    coord = _coordinator(tmp_path)
    _finish_one(coord)
    _finish_one(coord)
    coord.cancel()
    coord.write_progress("cancelled")  # saves the manifest
    s = JobStats.from_manifest(Manifest.load(str(tmp_path / "out")))
    assert (s.rows_total, s.rows_done, s.shards_total, s.shards_done, s.done) == (24, 8, 6, 2, False)
    assert (s.job_prompt_tokens, s.job_generated_tokens, s.prompt_tokens, s.tokens_per_s) == (24, 16, 0, 0.0)
    summary = summarize(str(tmp_path / "out"), s.job_id, "failed", s, wall_s=1.0)
    assert (summary.rows, summary.generated_tokens, summary.resumed, summary.per_worker) == (8, 16, False, {})


def _rows(lease) -> list[int]:
    return lease[1].column("row_index").to_pylist()


def test_a_piece_lost_before_is_held_alone_so_only_its_own_rows_pay(tmp_path):
    coord = _coordinator(tmp_path, rows=16, shard_rows=4)  # shards 0..3 of 4 rows
    for w in ("a", "b", "c"):
        coord.register(w, "node")
    first, second = coord.lease("a"), coord.lease("a")  # "a" holds shards 0 and 1 at once
    assert (_rows(first), _rows(second)) == ([0, 1, 2, 3], [4, 5, 6, 7])
    coord.worker_lost("a", "killed")  # both pieces lost once: now suspects, at the front of the queue
    held = coord.lease("b")
    assert _rows(held) in ([0, 1, 2, 3], [4, 5, 6, 7])
    assert coord.lease("b") == coordinator_mod.WAIT  # "b" holds a suspect: nothing more for it
    other = coord.lease("c")  # an idle worker takes the other suspect
    assert sorted(_rows(held) + _rows(other)) == list(range(8))
    coord.register("d", "node")
    normal = coord.lease("d")
    assert _rows(normal) == [8, 9, 10, 11]  # an ordinary piece
    coord.worker_lost("c", "killed")  # the other suspect again: split in halves, still suspects
    assert _rows(coord.lease("d")) == [12, 13, 14, 15]  # a busy worker skips suspects for ordinary work
    assert coord.lease("d") == coordinator_mod.WAIT  # only suspects are left: they wait for an idle worker
    coord.worker_lost("b", "killed")  # the lost pieces never charged each other: each lost alone
    assert coord.retries == 4
