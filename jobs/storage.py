"""Where job files live and how they are written: locations (local paths or URIs) resolved to
pyarrow filesystems, atomic writes (temporary name, then rename) and small reads."""

from __future__ import annotations

import logging
import os
import re
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import JobInputError

log = logging.getLogger(__name__)

MANIFEST_FILE = "_manifest.json"
PROGRESS_FILE = "_progress.json"  # kept current by the driver
CANCEL_FILE = "_cancel"  # written by `ternpool cancel`, polled by the driver
OWNER_FILE = "_owner"  # the run that may write this output now (fencing against a stale run)
LOCK_FILE = "_lock"  # flock'ed by the live driver for the job's whole life (local outputs)
METRICS_FILE = "_metrics.prom"  # the job's final metrics
OPENAI_OUTPUT_FILE = "output.jsonl"  # OpenAI Batch output lines, written at the end from the parts
OPENAI_ERRORS_FILE = "errors.jsonl"  # OpenAI Batch error lines (the failed requests)
# Every name ternpool writes in an output directory besides part files: nothing else is ours.
FIXED_NAMES = frozenset({MANIFEST_FILE, PROGRESS_FILE, CANCEL_FILE, OWNER_FILE, LOCK_FILE, METRICS_FILE,
                         OPENAI_OUTPUT_FILE, OPENAI_ERRORS_FILE})
_PART = re.compile(r"part-(\d{5,})\.parquet")
# write_atomic's temporaries: ".NAME.tmp-<32 hex>", and the manifest's fixed "_manifest.json.tmp"
_TEMPORARY = re.compile(r"\.(.+)\.tmp-[0-9a-f]{32}")


def part_name(shard_id: int) -> str:
    """The file name of one shard's output part."""
    return f"part-{shard_id:05d}.parquet"


def part_shard(name: str) -> int | None:
    """The shard id of a part file name (`part-00012.parquet` -> 12), else None."""
    match = _PART.fullmatch(name)
    return int(match.group(1)) if match else None


def is_ternpool_name(name: str) -> bool:
    """True for a name ternpool writes in an output directory: a fixed name, a part file, or a
    temporary of one of them (which part files an output may hold is ownership.py's business)."""
    temporary = _TEMPORARY.fullmatch(name)
    if temporary:
        name = temporary.group(1)
    elif name == MANIFEST_FILE + ".tmp":
        return True
    return name in FIXED_NAMES or part_shard(name) is not None


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations, False for plain local paths."""
    return "://" in location


def normalize(location: str) -> str:
    """A location that means the same from any working directory: local paths made absolute."""
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path within it for a local path or a URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), normalize(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise JobInputError(f"cannot open location {location!r}: {exc}") from None


def join(base: str, name: str) -> str:
    """`name` inside directory `base` (pyarrow filesystems use '/' everywhere)."""
    return f"{base.rstrip('/')}/{name}" if base else name


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of a file, or None when it does not exist."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Remove a file if it is there; a failure is logged, not raised (cleanup only)."""
    try:
        if exists(fs, path):
            fs.delete_file(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def write_atomic(fs: pafs.FileSystem, path: str, write, tmp_path: str | None = None) -> str:
    """Create `path` so that readers see either nothing (or the old file) or the whole new file:
    `write(stream)` fills a temporary file in the same directory, which is then renamed onto
    `path`. The directory is created when missing. Returns `path`."""
    directory, _, name = path.rpartition("/")
    if not is_ternpool_name(name):  # the rename replaces what is there: only ever one of our own files
        raise ValueError(f"ternpool does not write {path}: {name!r} is not a ternpool output file name")
    if tmp_path is None:
        tmp_path = join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    if directory:
        fs.create_dir(directory, recursive=True)
    try:
        with fs.open_output_stream(tmp_path) as stream:
            write(stream)
        fs.move(tmp_path, path)
    except BaseException:
        delete_quietly(fs, tmp_path)
        raise
    return path


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes,
                       tmp_path: str | None = None) -> str:
    """`write_atomic` for a bytes payload."""
    return write_atomic(fs, path, lambda stream: stream.write(data), tmp_path)
