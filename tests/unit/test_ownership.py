"""Ownership and identity of an output directory: ternpool writes only where it owns OUT, plans
without writing, holds one run per OUT, identifies the model by its content (hashed once) and
`status` tells a live driver from a dead one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.engine import identity
from ternpool.kernels.config import cache_root
from ternpool.jobs import JobInputError, Manifest, model_fingerprint, status
from ternpool.jobs import storage
from ternpool.jobs.progress import write_progress
from ternpool.jobs.runlock import OutputBusyError, OutputLock

from helpers import make_job, same_stat_write, snapshot

pytestmark = pytest.mark.unit

MODEL = {"files": {"config.json": "c", "model.safetensors": "w"}, "chat_template": None}


# -- item 1: OUT is written only where ternpool owns it -----------------------------------------


@pytest.mark.parametrize("make, named", [
    (lambda out: (out / "notes.txt").write_text("mine"), "notes.txt"),
    (lambda out: (out / "data").mkdir(), "data/"),
    (lambda out: (out / "part-00000.parquet").write_bytes(b"not ours"), "part-00000.parquet"),
    (lambda out: (out / ".part-00000.parquet.tmp").write_bytes(b"x"), ".part-00000.parquet.tmp"),
])
def test_an_output_holding_what_ternpool_did_not_write_is_refused_untouched(tmp_path, make, named):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = snapshot(out)
    spec, inputs, plan = make_job(tmp_path)
    with pytest.raises(JobInputError) as err:
        Manifest.open(spec.output, spec, inputs, plan, MODEL)
    assert named in str(err.value) and "empty or new --output directory" in str(err.value)
    assert snapshot(out) == before


def test_part_files_outside_the_plan_are_refused_on_resume(tmp_path):
    spec, inputs, plan = make_job(tmp_path)
    Manifest.open(spec.output, spec, inputs, plan, MODEL)
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "part-00002.parquet")  # in the plan: ours
    Manifest.open(spec.output, spec, inputs, plan, MODEL)
    (tmp_path / "out" / "part-00007.parquet").write_bytes(b"someone else's")
    with pytest.raises(JobInputError, match="part-00007.parquet, which is not a part of its job"):
        Manifest.open(spec.output, spec, inputs, plan, MODEL)


def test_an_empty_directory_and_ternpools_own_names_are_fine(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spec, inputs, plan = make_job(tmp_path)
    manifest = Manifest.open(spec.output, spec, inputs, plan, MODEL)
    for name in ("_progress.json", "_cancel", "_owner", "_lock", "_metrics.prom", "_manifest.json.tmp",
                 f".part-00001.parquet.tmp-{'ab' * 16}"):
        (out / name).write_text("{}")
    assert Manifest.open(spec.output, spec, inputs, plan, MODEL).job_id == manifest.job_id


def test_output_inside_the_inputs_or_inputs_inside_the_output_is_refused(tmp_path):
    spec, inputs, plan = make_job(tmp_path, out=tmp_path / "in" / "out")
    with pytest.raises(JobInputError, match="is inside the input location"):
        Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    os.symlink(tmp_path / "in", tmp_path / "link")  # the same place through a symlink
    spec, inputs, plan = make_job(tmp_path, out=tmp_path / "link" / "out")
    with pytest.raises(JobInputError, match="is inside the input location"):
        Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    # an input file inside OUT (OUT is a parent of the input directory)
    spec, inputs, plan = make_job(tmp_path, out=tmp_path)
    with pytest.raises(JobInputError, match="a.parquet is inside output"):
        Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    assert not (tmp_path / "in" / "out").exists() and not (tmp_path / "_manifest.json").exists()


def test_output_uri_inside_the_input_uri_is_refused(tmp_path):
    spec, inputs, plan = make_job(tmp_path, inputs=f"file://{tmp_path}/in", out=f"file://{tmp_path}/in/out")
    with pytest.raises(JobInputError, match="is inside the input location"):
        Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    spec, inputs, plan = make_job(tmp_path, inputs=f"file://{tmp_path}/in", out=str(tmp_path / "in" / "o2"))
    with pytest.raises(JobInputError, match="is inside the input location"):
        Manifest.for_job(spec.output, spec, inputs, plan, MODEL)


def test_write_atomic_only_ever_replaces_ternpool_names(tmp_path):
    fs, base = storage.resolve(str(tmp_path))
    (tmp_path / "users.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a ternpool output file name"):
        storage.write_bytes_atomic(fs, storage.join(base, "users.txt"), b"gone")
    assert (tmp_path / "users.txt").read_text() == "mine"


# -- item 2: planning writes nothing ------------------------------------------------------------


def test_planning_a_job_writes_nothing(tmp_path):
    spec, inputs, plan = make_job(tmp_path)
    manifest = Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    assert not (tmp_path / "out").exists() and not manifest.resumed
    manifest.create()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "out" / "part-00000.parquet")
    manifest.record(0, 4, 0)
    manifest.record(1, 4, 0)  # recorded, but its part file is gone: done again
    before = snapshot(tmp_path / "out")
    again = Manifest.for_job(spec.output, spec, inputs, plan, MODEL)
    assert again.resumed and again.done_shards() == {0}
    assert snapshot(tmp_path / "out") == before


def test_dry_run_writes_nothing(tmp_path, tiny_model, capsys):
    from ternpool.cluster.cli import main

    spec, inputs, plan = make_job(tmp_path)
    assert main(["submit", spec.inputs, "--model", tiny_model, "--output", spec.output, "--dry-run"]) == 0
    assert "shards:" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    assert main(["submit", spec.inputs, "--model", tiny_model, "--output", spec.output, "--dry-run"]) == 0
    assert snapshot(tmp_path / "out") == {}


def test_a_submit_refused_for_a_busy_port_or_a_foreign_file_leaves_out_as_it_was(tmp_path, tiny_model, capsys):
    import socket

    from ternpool.cluster.cli import main

    spec, inputs, plan = make_job(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["submit", spec.inputs, "--model", tiny_model, "--output", spec.output, "--no-progress",
                "--metrics-port", str(port)]
        assert main(args) == 2
        assert str(port) in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.csv").write_text("a user's file")
    before = snapshot(tmp_path / "out")
    assert main(args[:-1] + ["-1"]) == 2
    assert "results.csv" in capsys.readouterr().err
    assert snapshot(tmp_path / "out") == before


# -- item 3: resume identifies the model by its content ------------------------------------------


def make_model_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "bitnet"}')
    (path / "model.safetensors").write_bytes(b"W" * 1000)
    (path / "tokenizer.json").write_text('{"v": 1}')
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ a }}", "bos": "<s>"}))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda m: same_stat_write(m / "model.safetensors", b"V" * 1000), "model weights changed (model.safetensors)"),
    (lambda m: same_stat_write(m / "tokenizer.json", b'{"v": 2}'), "tokenizer changed (tokenizer.json)"),
    (lambda m: (m / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ b }}", "bos": "<s>"})),
     "chat template changed (tokenizer_config.json)"),
    (lambda m: (m / "chat_template.jinja").write_text("{{ c }}"), "chat template changed (chat_template.jinja added)"),
])
def test_resuming_with_another_model_of_the_same_shape_is_refused_naming_what_changed(tmp_path, change, message):
    model = make_model_dir(tmp_path / "model")
    spec, inputs, plan = make_job(tmp_path)
    Manifest.open(spec.output, spec, inputs, plan, model_fingerprint(str(model)))
    change(model)
    with pytest.raises(JobInputError) as err:
        Manifest.for_job(spec.output, spec, inputs, plan, model_fingerprint(str(model)))
    assert message in str(err.value), str(err.value)


def test_model_hashes_are_cached_and_a_touched_file_is_hashed_again(tmp_path, monkeypatch):
    model = make_model_dir(tmp_path / "model")
    hashed = []
    real = identity.hash_file
    monkeypatch.setattr(identity, "hash_file", lambda p: hashed.append(Path(p).name) or real(p))
    first = model_fingerprint(str(model))
    assert sorted(hashed) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    hashed.clear()
    assert model_fingerprint(str(model)) == first
    assert hashed == []  # nothing re-read: the weights' digest came from the cache
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(str(model)) == first
    assert hashed == ["model.safetensors"]
    assert list((cache_root() / "hashes").glob("*.json"))  # under TERNPOOL_CACHE_DIR


# -- item 5: one run per OUT ---------------------------------------------------------------------

_HOLD = ("import sys; from ternpool.jobs.runlock import OutputLock; lock = OutputLock(sys.argv[1]); "
         "lock.acquire(); print('locked', flush=True); sys.stdin.read()")


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("end", ["exit", "sigkill"])
def test_a_second_run_on_the_same_output_is_refused_until_the_first_is_gone(tmp_path, end):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(OutputBusyError) as err:
            OutputLock(str(out)).acquire()
        text = str(err.value)
        assert f"being written by another ternpool run, pid {holder.pid} on host " in text
        assert f"ternpool cancel {out}" in text
    finally:
        if end == "exit":
            holder.stdin.close()
        else:
            holder.kill()
        holder.wait(timeout=60)
    lock = OutputLock(str(out))
    lock.acquire()  # free again: the OS released it with the process
    assert json.loads((out / "_lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_refused_run_removes_the_lock_and_directories_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    lock = OutputLock(str(out))
    lock.acquire()
    assert (out / "_lock").exists()
    lock.release(undo=True)
    assert not (tmp_path / "a").exists()
    (tmp_path / "kept").mkdir()
    lock = OutputLock(str(tmp_path / "kept"))
    lock.acquire()
    lock.release(undo=True)
    assert snapshot(tmp_path / "kept") == {}
    (tmp_path / "kept" / "_lock").write_text('{"pid": 1, "host": "h", "since": 0}')  # a past run's
    before, mtime = snapshot(tmp_path / "kept"), (tmp_path / "kept" / "_lock").stat().st_mtime_ns
    lock = OutputLock(str(tmp_path / "kept"))
    lock.acquire()
    assert json.loads((tmp_path / "kept" / "_lock").read_text())["pid"] == os.getpid()
    lock.release(undo=True)
    assert snapshot(tmp_path / "kept") == before
    assert (tmp_path / "kept" / "_lock").stat().st_mtime_ns == mtime


# -- item 6: status tells the truth --------------------------------------------------------------


def test_status_says_failed_with_the_error_and_gone_for_a_dead_driver(tmp_path):
    spec, inputs, plan = make_job(tmp_path)
    Manifest.open(spec.output, spec, inputs, plan, MODEL)
    write_progress(spec.output, {"state": "failed", "error": "21 worker losses: giving up"})
    st = status(spec.output)
    assert st["state"] == "failed" and st["error"] == "21 worker losses: giving up"
    holder = hold_lock(tmp_path / "out")
    try:
        write_progress(spec.output, {"state": "running", "updated": time.time()})
        st = status(spec.output)
        assert st["state"] == "running" and st["driver"]["pid"] == holder.pid and st["error"] is None
    finally:
        holder.kill()
        holder.wait(timeout=60)
    st = status(spec.output)  # the same progress file: its driver was killed
    assert st["state"] == "incomplete" and st["driver"] is None
    assert "the driver is gone" in st["error"]
