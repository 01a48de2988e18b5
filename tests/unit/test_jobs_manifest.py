"""The manifest (create, resume, refuse a different job, atomic save), the model fingerprint,
and progress, cancel and status from another shell."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.engine.requests import SamplingParams
from ternpool.jobs import JobInputError, Manifest, model_fingerprint, request_cancel, status
from ternpool.jobs.manifest import FORMAT_VERSION
from ternpool.jobs.progress import CANCEL_FILE, PROGRESS_FILE, cancel_requested, clear_cancel, \
    read_progress, write_progress
from ternpool.jobs.runlock import OutputLock

from helpers import make_job

pytestmark = pytest.mark.unit

MODEL = {"config_sha256": "abc", "weights": [{"name": "model.safetensors", "size": 10}]}


def open_manifest(tmp_path, model=MODEL, **spec_kwargs) -> Manifest:
    spec, inputs, plan = make_job(tmp_path, **spec_kwargs)
    return Manifest.open(spec.output, spec, inputs, plan, model)


def touch_part(manifest: Manifest, shard_id: int) -> None:
    pq.write_table(pa.table({"row_index": [shard_id]}),
                   os.path.join(manifest.output, f"part-{shard_id:05d}.parquet"))


def test_create_writes_manifest(tmp_path):
    manifest = open_manifest(tmp_path, sampling=SamplingParams(seed=5, stop=("\n",)))
    path = tmp_path / "out" / "_manifest.json"
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["num_shards"] == 3 and data["num_rows"] == 10
    assert data["completed"] == {} and data["finished"] is None
    assert data["model"] == MODEL
    assert data["sampling"] == {"max_tokens": 128, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                "seed": 5, "stop": ["\n"], "shard_rows": 4, "truncate": "error"}
    assert data["inputs"] == [{"path": str(tmp_path / "in" / "a.parquet"),
                               "size": os.path.getsize(tmp_path / "in" / "a.parquet"),
                               "mtime": data["inputs"][0]["mtime"]}]
    assert data["job_id"] == manifest.job_id and data["created"] <= time.time()
    text = path.read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys


def test_resume_keeps_completed_and_job_id(tmp_path):
    first = open_manifest(tmp_path)
    touch_part(first, 1)
    first.record(1, 4, 1)
    assert first.is_done(1) and not first.is_done(0)
    again = open_manifest(tmp_path)
    assert again.job_id == first.job_id and again.created == first.created
    assert again.completed == {1: {"rows": 4, "file": "part-00001.parquet", "failed_rows": 1}}
    assert again.is_done(1) and not again.is_done(2)


def test_record_sets_finished(tmp_path):
    manifest = open_manifest(tmp_path)
    for shard_id in range(3):
        touch_part(manifest, shard_id)
        assert manifest.finished is None
        manifest.record(shard_id, 4, 0)
    assert manifest.finished is not None
    assert Manifest.load(manifest.output).finished == manifest.finished


def test_resume_redoes_shards_whose_part_vanished(tmp_path):
    manifest = open_manifest(tmp_path)
    for shard_id in (0, 1):
        touch_part(manifest, shard_id)
        manifest.record(shard_id, 4, 0)
    os.remove(os.path.join(manifest.output, "part-00000.parquet"))
    again = open_manifest(tmp_path)
    assert set(again.completed) == {1}


def test_refuses_changed_input(tmp_path):
    open_manifest(tmp_path)
    path = tmp_path / "in" / "a.parquet"
    old_size = os.path.getsize(path)
    pq.write_table(pa.table({"prompt": [f"changed prompt {i}" for i in range(10)]}), path)
    with pytest.raises(JobInputError) as info:
        open_manifest(tmp_path)
    message = str(info.value)
    assert f"input {path} changed" in message
    assert f"size {old_size} -> {os.path.getsize(path)}" in message
    assert "--output" in message


def test_refuses_added_input_file(tmp_path):
    open_manifest(tmp_path)
    pq.write_table(pa.table({"prompt": ["more"]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(JobInputError) as info:
        open_manifest(tmp_path)
    assert "b.parquet was not among the inputs" in str(info.value)
    assert "num_rows changed (10 -> 11)" in str(info.value)


def test_refuses_changed_model(tmp_path):
    open_manifest(tmp_path)
    with pytest.raises(JobInputError) as info:
        open_manifest(tmp_path, model={**MODEL, "config_sha256": "def"})
    assert "model config_sha256 changed ('abc' -> 'def')" in str(info.value)


def test_refuses_changed_sampling(tmp_path):
    open_manifest(tmp_path)
    with pytest.raises(JobInputError) as info:
        open_manifest(tmp_path, sampling=SamplingParams(temperature=0.7, seed=1))
    message = str(info.value)
    assert "sampling temperature changed (0.0 -> 0.7)" in message
    assert "sampling seed changed (0 -> 1)" in message
    with pytest.raises(JobInputError, match=r"sampling shard_rows changed \(4 -> 5\)"):
        open_manifest(tmp_path, shard_rows=5)


def test_refuses_other_format_version_and_corrupt_manifest(tmp_path):
    manifest = open_manifest(tmp_path)
    path = tmp_path / "out" / "_manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(JobInputError, match="format version 99"):
        open_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(JobInputError) as info:
        Manifest.load(manifest.output)
    assert str(path) in str(info.value) and "corrupt" in str(info.value)
    with pytest.raises(JobInputError, match="no job manifest"):
        Manifest.load(str(tmp_path / "elsewhere"))


class CrashingMove:
    """A filesystem that does everything but the final rename (a crash just before it)."""

    def __init__(self, fs, moves):
        self._fs, self._moves = fs, moves

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def move(self, src, dest):
        self._moves.append((os.path.basename(src), os.path.basename(dest)))
        raise OSError("crash before rename")


def test_save_is_atomic(tmp_path, monkeypatch):
    import ternpool.jobs.storage as storage

    manifest = open_manifest(tmp_path)
    path = tmp_path / "out" / "_manifest.json"
    before = path.read_text()
    moves = []
    real_resolve = storage.resolve

    def crashing_resolve(location):
        fs, base = real_resolve(location)
        return CrashingMove(fs, moves), base

    monkeypatch.setattr(storage, "resolve", crashing_resolve)
    with pytest.raises(OSError, match="crash before rename"):
        manifest.record(0, 4, 0)
    assert moves == [("_manifest.json.tmp", "_manifest.json")]
    assert path.read_text() == before  # the old manifest is intact
    assert sorted(os.listdir(tmp_path / "out")) == ["_manifest.json"]
    monkeypatch.setattr(storage, "resolve", real_resolve)
    manifest.record(0, 4, 0)
    assert json.loads(path.read_text())["completed"] == {
        "0": {"rows": 4, "file": "part-00000.parquet", "failed_rows": 0}}


def test_model_fingerprint(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"model_type": "bitnet"}')
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 7)
    (tmp_path / "model.safetensors.index.json").write_bytes(b"{}")
    (tmp_path / "tokenizer.json").write_bytes(b"{}")
    (tmp_path / "README.md").write_bytes(b"not part of the model")
    fingerprint = model_fingerprint(str(tmp_path))
    import hashlib

    def sha(name):
        return hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()

    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "tokenizer.json"]
    assert fingerprint == {"files": {n: sha(n) for n in names}, "chat_template": None}
    with pytest.raises(JobInputError, match="config.json"):
        model_fingerprint(str(tmp_path / "nowhere"))


# -- progress, cancel, status ----------------------------------------------------------------


def test_progress_roundtrip(tmp_path):
    out = str(tmp_path / "out")
    assert read_progress(out) is None
    write_progress(out, {"state": "running", "tokens_per_s": 12.5})
    progress = read_progress(out)
    assert progress["state"] == "running" and progress["tokens_per_s"] == 12.5
    assert abs(progress["updated"] - time.time()) < 5
    assert sorted(os.listdir(out)) == [PROGRESS_FILE]  # no temporary left behind
    (tmp_path / "out" / PROGRESS_FILE).write_text("{broken")
    assert read_progress(out) is None


def test_cancel_flag(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(JobInputError, match="nothing to cancel"):
        request_cancel(out)  # not a ternpool output: nothing is written there
    assert not os.path.exists(out)
    open_manifest(tmp_path)
    assert not cancel_requested(out)
    request_cancel(out)
    assert cancel_requested(out) and os.path.exists(os.path.join(out, CANCEL_FILE))
    clear_cancel(out)
    assert not cancel_requested(out)
    clear_cancel(out)  # clearing twice is fine


def test_status_states(tmp_path):
    manifest = open_manifest(tmp_path)
    out = manifest.output
    st = status(out)
    assert st == {"job_id": manifest.job_id, "state": "incomplete", "rows_total": 10,
                  "rows_done": 0, "shards_total": 3, "shards_done": 0, "failed_rows": 0,
                  "tokens_per_s": None, "updated": manifest.created, "eta_s": None, "error": None,
                  "driver": None, "cost": None, "job_prompt_tokens": 0, "job_generated_tokens": 0,
                  "job_cached_tokens": 0}
    touch_part(manifest, 0)
    manifest.record(0, 4, 1, prompt_tokens=90, generated_tokens=12, cached_tokens=64)
    write_progress(out, {"state": "running", "tokens_per_s": 33.0})
    lock = OutputLock(out)
    lock.acquire()  # a live driver holds OUT
    st = status(out)
    assert st["state"] == "running" and st["rows_done"] == 4 and st["shards_done"] == 1
    assert st["failed_rows"] == 1 and st["tokens_per_s"] == 33.0
    assert (st["job_prompt_tokens"], st["job_generated_tokens"], st["job_cached_tokens"]) == (90, 12, 64)
    assert st["driver"]["pid"] == os.getpid() and st["error"] is None
    lock.release()
    st = status(out)  # the same fresh progress, but its driver is gone
    assert st["state"] == "incomplete" and st["driver"] is None
    assert st["error"].startswith("the driver is gone (last update ")
    write_progress(out, {"state": "cancelled"})
    assert status(out)["state"] == "cancelled"
    for shard_id in (1, 2):
        touch_part(manifest, shard_id)
        manifest.record(shard_id, 3, 0)
    st = status(out)
    assert st["state"] == "finished" and st["rows_done"] == 10 and st["shards_done"] == 3


def test_status_without_manifest(tmp_path):
    with pytest.raises(JobInputError, match="no job manifest"):
        status(str(tmp_path / "out"))


def test_output_that_is_a_file_is_refused(tmp_path):
    spec, inputs, plan = make_job(tmp_path)
    (tmp_path / "out").write_text("a file, not a directory")
    with pytest.raises(JobInputError, match="exists and is not a directory"):
        Manifest.open(spec.output, spec, inputs, plan, MODEL)


def test_relative_output_is_made_absolute(tmp_path, monkeypatch):
    spec, inputs, plan = make_job(tmp_path)
    monkeypatch.chdir(tmp_path)
    manifest = Manifest.open("rel-out", spec, inputs, plan, MODEL)
    assert os.path.isabs(manifest.output)
    assert manifest.output == str(tmp_path / "rel-out")
    assert (tmp_path / "rel-out" / "_manifest.json").exists()


def test_a_new_run_fences_off_the_old_one(tmp_path):
    from ternpool.jobs.progress import claim_output, owns_output

    out = str(tmp_path / "out")
    first = claim_output(out)
    assert owns_output(out, first)
    second = claim_output(out)
    assert owns_output(out, second) and not owns_output(out, first)
    assert not owns_output(str(tmp_path / "elsewhere"), second)
