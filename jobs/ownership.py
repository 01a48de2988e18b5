"""Which output directories ternpool may write: only one it owns. An output holding anything
ternpool did not write (a user's file, a subdirectory, part files without a manifest), an output
inside the inputs or inputs inside the output, is refused before anything is written, so that
nothing a user wrote is ever renamed, replaced or deleted. Reads only."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

from . import storage
from .errors import JobInputError
from .inputs import InputSet, _strip_glob

_USE_ANOTHER = "use an empty or new --output directory"


def check_output(output: str, inputs: InputSet, num_shards: int, recorded: set[int] | None) -> None:
    """Refuse `output` unless ternpool may write there: it does not exist, is an empty directory,
    or holds only names ternpool writes (`storage.is_ternpool_name`) with part files that belong to
    this job (`recorded`: the shard ids its manifest lists, None when it has no manifest: then no
    part file is ours; otherwise a part of the plan's 0..num_shards-1 is a shard being rewritten).
    JobInputError naming the offending file and what to do."""
    _check_not_nested(output, inputs)
    fs, base = storage.resolve(output)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise JobInputError(f"output {output} exists and is not a directory; {_USE_ANOTHER}")
    try:
        entries = fs.get_file_info(pafs.FileSelector(base))
    except OSError as exc:
        raise JobInputError(f"cannot list output {output}: {exc}") from None
    for entry in sorted(entries, key=lambda e: e.base_name):
        name = entry.base_name
        if entry.type == pafs.FileType.Directory:
            raise JobInputError(f"output {output} holds the directory {name}/, which ternpool did not "
                                f"write; ternpool writes only into a directory it owns: {_USE_ANOTHER}")
        shard = storage.part_shard(name)
        if shard is not None:
            if recorded is None:
                raise JobInputError(f"output {output} holds {name} but no ternpool manifest "
                                    f"({storage.MANIFEST_FILE}): ternpool would overwrite a part file it "
                                    f"did not write; {_USE_ANOTHER}")
            if shard not in recorded and not 0 <= shard < num_shards:
                raise JobInputError(f"output {output} holds {name}, which is not a part of its job "
                                    f"({num_shards} shards); {_USE_ANOTHER}")
        elif not storage.is_ternpool_name(name):
            raise JobInputError(f"output {output} holds {name}, which ternpool did not write; ternpool "
                                f"writes only into a directory it owns and never touches other files: "
                                f"{_USE_ANOTHER}")


def _check_not_nested(output: str, inputs: InputSet) -> None:
    """Refuse an output inside the input location (e.g. under an input directory), or an input
    file inside the output. Local paths are compared with symlinks resolved."""
    out = _canonical(output)
    input_fs = _fs_name(inputs.uri)
    places = [("input location", _canonical(_strip_glob(inputs.uri)))]
    places += [("input file", (input_fs, _real(f.path) if input_fs == "local" else f.path))
               for f in inputs.files]
    for what, place in places:
        if _inside(out, place):
            raise JobInputError(f"output {output} is inside the {what} {place[1]}: ternpool would write "
                                f"among its inputs; use an --output directory outside the inputs")
        if what == "input file" and _inside(place, out):
            raise JobInputError(f"{what} {place[1]} is inside output {output}: ternpool would write among "
                                f"its inputs; use an --output directory outside the inputs")


def _fs_name(location: str) -> str:
    scheme = location.split("://", 1)[0] if storage.is_uri(location) else "file"
    return "local" if scheme == "file" else scheme


def _real(path: str) -> str:
    return os.path.realpath(storage.normalize(path))


def _canonical(location: str) -> tuple[str, str]:
    """(filesystem, path within it): local paths with symlinks resolved, URIs as pyarrow opens them."""
    if not storage.is_uri(location):
        return "local", _real(location)
    _, path = storage.resolve(location)
    name = _fs_name(location)
    return name, _real(path) if name == "local" else path.rstrip("/")


def _inside(path: tuple[str, str], directory: tuple[str, str]) -> bool:
    """True when `path` is `directory` or below it, on the same filesystem."""
    if path[0] != directory[0]:
        return False
    return path[1] == directory[1] or path[1].startswith(directory[1].rstrip("/") + "/")
