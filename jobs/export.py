"""`ternpool export`: a finished job's output written again from its Parquet parts into one file
of the user's choosing, as OpenAI Batch lines, JSON Lines or one Parquet file (JSON writes a
logprob of -inf as -9999.0, as OpenAI does; Parquet keeps -inf). Atomic (temporary name, then
rename); an existing file is replaced only when asked (`force`); never inside the job's output
directory (ternpool's own) nor inside its inputs."""

from __future__ import annotations

import io
import json
import uuid

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ternpool.engine.requests import json_logprobs

from . import storage
from .errors import JobInputError
from .inputs import _strip_glob
from .manifest import Manifest
from .openai_output import render
from .output import LOGPROB_COLUMNS, read_complete_output

EXPORT_FORMATS = ("openai", "jsonl", "parquet")


def errors_path(to: str) -> str:
    """Where `export --format openai --to TO` writes the error lines: TO with `.errors` before its
    suffix (`results.jsonl` -> `results.errors.jsonl`)."""
    head, dot, suffix = to.rpartition(".")
    return f"{head}.errors.{suffix}" if dot and "/" not in suffix else f"{to}.errors"


def _inside(path: str, directory: str) -> bool:
    directory = directory.rstrip("/")
    return path == directory or path.startswith(directory + "/")


def _check_target(manifest: Manifest, to: str, force: bool) -> None:
    if _inside(to, manifest.output):
        raise JobInputError(f"export target {to} is inside the job's output directory {manifest.output}, which "
                            "holds only what ternpool writes there; choose a path outside it")
    inputs = [f["path"] for f in manifest.inputs]
    uri = manifest.about.get("input_uri")
    if uri is not None:
        fs, base = storage.resolve(_strip_glob(uri))
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            inputs.append(storage.normalize(_strip_glob(uri)))
    for location in inputs:
        if _inside(to, storage.normalize(location)) or _inside(to, location):
            raise JobInputError(f"export target {to} is inside the job's input {location}: ternpool never "
                                "writes among its inputs; choose another path")
    fs, path = storage.resolve(to)
    if storage.exists(fs, path) and not force:
        raise JobInputError(f"export target {to} exists; ternpool does not replace it unless --force is given")


def _write(to: str, data: bytes) -> None:
    fs, path = storage.resolve(to)
    directory, _, name = path.rpartition("/")
    tmp = storage.join(directory, f".{name}.tmp-{uuid.uuid4().hex}") if directory else f".{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        fs.move(tmp, path)
    except BaseException:
        storage.delete_quietly(fs, tmp)
        raise


def export(output: str, fmt: str, to: str, force: bool = False) -> list[tuple[str, int]]:
    """Write the job in `output` to `to` as `fmt` (one of EXPORT_FORMATS); for "openai" the error
    lines go to `errors_path(to)`. Returns (path, lines or rows) of each file written. JobInputError
    when a target is refused (exists without `force`, inside OUT or the inputs) or the job is not
    complete."""
    if fmt not in EXPORT_FORMATS:
        raise JobInputError(f"unknown export format {fmt!r} (one of {', '.join(EXPORT_FORMATS)})")
    manifest = Manifest.load(output)
    to = storage.normalize(to)
    targets = [to, storage.normalize(errors_path(to))] if fmt == "openai" else [to]
    for target in targets:
        _check_target(manifest, target, force)
    if fmt == "openai":
        ok, failed, n_ok, n_failed = render(output)
        _write(targets[0], ok)
        _write(targets[1], failed)
        return [(targets[0], n_ok), (targets[1], n_failed)]
    _, table = read_complete_output(output)
    if fmt == "jsonl":
        rows = table.to_pylist()
        for row in rows:
            for name in LOGPROB_COLUMNS:
                row[name] = json_logprobs(row.get(name))
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    else:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        data = buffer.getvalue()
    _write(to, data)
    return [(to, table.num_rows)]
