"""A job whose OUT fills up: it fails with the OS error instead of losing shards or retrying forever,
and a rerun with space completes it."""

from __future__ import annotations

import json
import secrets
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.jobs import read_output

from helpers import CLI

pytestmark = pytest.mark.cluster


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (needs root and a kernel that lets this process mount: else skipped)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): "
                    "the full-disk test needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_job_with_the_os_error_and_a_rerun_with_space_finishes(tmp_path, tiny_model,
                                                                                      small_disk):
    rows = 48
    src = tmp_path / "prompts.parquet"
    # 6,000 random hex characters a row: a part file of 4 rows is ~25 KB, so about three fit the disk
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "prompt": [f"story {i}" for i in range(rows)],
                             "blob": [secrets.token_hex(3000) for _ in range(rows)]}), src)
    out = small_disk / "out"
    cmd = [*CLI, "submit", str(src), "--model", tiny_model,
           "--output", str(out), "--max-tokens", "2", "--shard-rows", "4", "--threads-per-worker", "1",
           "--no-progress"]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    error_lines = [ln for ln in failed.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 1 and "No space left on device" in error_lines[0], failed.stderr
    assert "failed" in failed.stdout
    progress = json.loads((out / "_progress.json").read_text())
    assert progress["state"] == "failed" and "No space left on device" in progress["error"]
    manifest = json.loads((out / "_manifest.json").read_text())
    kept = read_output(str(out)).column("row_index").to_pylist()
    assert len(kept) == 4 * len(manifest["completed"]) and len(set(kept)) == len(kept)  # recorded shards kept
    assert 0 < len(manifest["completed"]) < rows // 4

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    table = read_output(str(out))
    assert table.column("row_index").to_pylist() == list(range(rows))
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(rows)]
    assert table.column("error").null_count == rows
