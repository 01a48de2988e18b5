"""The input side of a job: resolving a path, directory, glob or URI to input files and checking
their schemas from metadata alone (`open_inputs` -> `InputSet`). What a file holds is its format's
business (`formats`); this module is the same for all of them."""

from __future__ import annotations

import fnmatch
import glob
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from . import formats, storage
from .errors import JobInputError
from .output import OUTPUT_COLUMNS
from .spec import SAMPLING_COLUMNS

log = logging.getLogger(__name__)

TEXT_COLUMNS = ("prompt", "messages")
INTEGER_SAMPLING_COLUMNS = ("max_tokens", "top_k", "seed", "top_logprobs", "prompt_logprobs")  # integer or float with integral values
_GLOB_CHARS = ("*", "?", "[")

_EXPECTED_SAMPLING_TYPES = {
    "max_tokens": "an integer or floating point type (with integral values)",
    "temperature": "a floating point or integer type",
    "top_p": "a floating point or integer type",
    "top_k": "an integer or floating point type (with integral values)",
    "seed": "an integer or floating point type (with integral values)",
    "stop": "string or list<string>",
    "logprobs": "bool",
    "top_logprobs": "an integer or floating point type (with integral values)",
    "prompt_logprobs": "an integer or floating point type (with integral values)",
    "response_format": "string (JSON text) or struct",
    "guided_choice": "list<string>",
    "guided_regex": "string",
    "logprobs_mode": "string",
}


@dataclass(frozen=True)
class InputFile:
    """One input file, described from its metadata."""

    path: str  # path as the filesystem knows it (sorted order defines row_index)
    size: int
    mtime: float | None  # seconds since the epoch, or None when the filesystem gives none
    num_rows: int
    chunk_rows: tuple[int, ...]  # rows in each chunk (formats.FileLayout), in file order
    format: str  # the name of its InputFormat in the `formats` registry


@dataclass(frozen=True)
class InputSet:
    """The validated inputs of a job: files in row_index order and what their columns mean."""

    uri: str
    files: tuple[InputFile, ...]
    text_column: str  # "prompt" or "messages"
    sampling_columns: tuple[str, ...]  # which of SAMPLING_COLUMNS are present
    passthrough: tuple[str, ...]  # every other column, in schema order, including "id"
    schema: pa.Schema  # the (common) schema of the files

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def filesystem(self) -> pafs.FileSystem:
        """The filesystem of the files, re-created from `uri` (so the object pickles cheaply)."""
        fs, _ = storage.resolve(_strip_glob(self.uri))
        return fs

    def fingerprint(self) -> list[dict[str, Any]]:
        """What the manifest records to notice changed inputs on resume."""
        return [{"path": f.path, "size": f.size, "mtime": f.mtime} for f in self.files]


def open_inputs(uri: str, input_format: str | None = None) -> InputSet:
    """Resolve `uri` (an input file, a directory of them, a glob, or a URI pyarrow.fs opens),
    describe every file with its format (`input_format`, a registered name, or else detected:
    `formats.detect`) and check the schema. Reads no rows
    (for Parquet: no data pages).

    Raises JobInputError naming the file and column for anything that would make the job fail.
    """
    if not isinstance(uri, str) or not uri:
        raise JobInputError(f"input location must be a non-empty string, got {uri!r}")
    chosen = None if input_format is None else formats.named(input_format)
    location = storage.normalize(uri)
    fs, infos = _list_files(location)
    if not infos:
        raise JobInputError(f"no {formats.labels()} files found at {uri!r}")
    files: list[InputFile] = []
    schemas: list[pa.Schema] = []
    keys: dict[str, tuple[str, int]] = {}  # request key -> (file, line) over all files
    for info in infos:
        input_file, layout = _describe(fs, info, chosen)
        files.append(input_file)
        schemas.append(layout.schema)
        _check_keys_unique(keys, input_file.path, layout.keys or {})
    schema = schemas[0]
    text_column, sampling_columns, passthrough = _check_schema(files[0].path, schema)
    for other_file, other in zip(files[1:], schemas[1:]):
        _check_same_schema(files[0].path, schema, other_file.path, other)
    input_set = InputSet(location, tuple(files), text_column, sampling_columns, passthrough, schema)
    if input_set.num_rows == 0:
        raise JobInputError(f"no rows: the {len(files)} input file(s) at {uri!r} hold 0 rows "
                            f"(first file: {files[0].path})")
    log.info("inputs %s: %d file(s), %d rows, text column %r", uri, len(files),
             input_set.num_rows, text_column)
    return input_set


# -- resolving locations ---------------------------------------------------------------------


def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _strip_glob(location: str) -> str:
    """The part of `location` before its first component with a glob character."""
    if not _has_glob(location):
        return location
    parts = location.split("/")
    for i, part in enumerate(parts):
        if _has_glob(part):
            return "/".join(parts[:i]) or "/"
    return location


def _is_hidden(name: str) -> bool:
    return name.startswith("_") or name.startswith(".")


def _inputs_under(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """Every file under `directory` with a registered format's suffix (`*.parquet`, ...),
    recursively, skipping `_*` and `.*` names."""
    selector = pafs.FileSelector(directory, recursive=True)
    prefix = directory.rstrip("/") + "/"
    found = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not formats.is_listed(info.base_name):
            continue
        relative = info.path[len(prefix):] if info.path.startswith(prefix) else info.base_name
        if any(_is_hidden(part) for part in relative.split("/")):
            continue
        found.append(info)
    return found


def _expand(fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> list[pafs.FileInfo]:
    """Files stay, directories become the input files under them."""
    out: list[pafs.FileInfo] = []
    for info in infos:
        if info.type == pafs.FileType.Directory:
            out.extend(_inputs_under(fs, info.path))
        elif info.type == pafs.FileType.File:
            out.append(info)
    return out


def _list_files(location: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The filesystem and the input files of `location`, sorted by path."""
    fs, path = storage.resolve(_strip_glob(location))
    if _has_glob(location):
        # A file whose name really contains a glob character wins over the pattern.
        try:
            literal_fs, literal_path = storage.resolve(location)
            literal = literal_fs.get_file_info(literal_path)
        except JobInputError:  # a pattern that is not a valid URI by itself
            literal = None
        if literal is not None and literal.type != pafs.FileType.NotFound:
            fs, infos = literal_fs, _expand(literal_fs, [literal])
        elif storage.is_uri(location):
            infos = _expand(fs, _glob_fs(fs, path, location))
        else:
            matches = sorted(glob.glob(location, recursive=True))
            infos = _expand(fs, fs.get_file_info(matches)) if matches else []
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise JobInputError(f"input {location!r} does not exist")
        infos = _expand(fs, [info])
    unique = {info.path: info for info in infos}
    return fs, [unique[p] for p in sorted(unique)]


def _glob_fs(fs: pafs.FileSystem, base: str, location: str) -> list[pafs.FileInfo]:
    """Match a glob URI on any pyarrow filesystem: list everything under the part before the
    first wildcard and match the remaining path components one by one (`**` spans any number
    of components; wildcards do not match names starting with '.')."""
    pattern = location[len(_strip_glob(location)):].strip("/").split("/")
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return []
    recursive = len(pattern) > 1 or "**" in pattern
    prefix = base.rstrip("/") + "/"
    matches = []
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=recursive)):
        relative = entry.path[len(prefix):] if entry.path.startswith(prefix) else entry.base_name
        if _match_parts(relative.split("/"), pattern):
            matches.append(entry)
    return matches


def _match_parts(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match_parts(parts[i:], rest) for i in range(len(parts) + 1)
                   if all(not p.startswith(".") for p in parts[:i]))
    if not parts:
        return False
    name = parts[0]
    if name.startswith(".") and not head.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, head) and _match_parts(parts[1:], rest)


# -- metadata and schema ---------------------------------------------------------------------


def _check_keys_unique(seen: dict[str, tuple[str, int]], path: str, keys: dict[str, int]) -> None:
    """JobInputError naming both files and lines when a request key (custom_id) of `path` is already
    used by another input file (a format refuses a key repeated within one file itself)."""
    repeated = [key for key in keys if key in seen]
    if repeated:
        shown = "; ".join(f"{key!r} on line {seen[key][1]} of {seen[key][0]} and line {keys[key]} of {path}"
                          for key in repeated[:5])
        raise JobInputError(f"{len(repeated)} custom_id(s) appear in more than one input file ({shown}"
                            f"{'; ...' if len(repeated) > 5 else ''}); every request of a job needs its own")
    seen.update((key, (path, line)) for key, line in keys.items())


def _describe(fs: pafs.FileSystem, info: pafs.FileInfo,
              chosen: formats.InputFormat | None) -> tuple[InputFile, formats.FileLayout]:
    """One file as its format describes it; JobInputError naming the file when it cannot."""
    path = info.path
    size = info.size if info.size is not None else -1
    mtime = info.mtime_ns / 1e9 if info.mtime_ns is not None else None
    input_format = chosen or formats.detect(fs, path)
    layout = input_format.describe(fs, path, size)
    if sum(layout.chunk_rows) != layout.num_rows:
        raise JobInputError(f"input file {path}: its chunks hold {sum(layout.chunk_rows)} rows but "
                            f"the file has {layout.num_rows}")
    return InputFile(path, size, mtime, layout.num_rows, layout.chunk_rows, input_format.name), layout


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _messages_problem(t: pa.DataType) -> str | None:
    """Why `t` is not list<struct<role: string, content: string>>, or None when it is."""
    if not _is_list(t):
        return "it is not a list"
    item = t.value_type
    if not pa.types.is_struct(item):
        return "its items are not structs"
    names = [item.field(i).name for i in range(item.num_fields)]
    for needed in ("role", "content"):
        if needed not in names:
            return f"its structs have no {needed!r} field (fields: {names})"
        field_type = item.field(needed).type
        if not _is_text(field_type):
            return f"its {needed!r} field is {field_type}, not string"
    return None


def _sampling_type_ok(name: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):  # an all-null column: every row uses the job default
        return True
    if name in INTEGER_SAMPLING_COLUMNS:
        # pandas writes an integer column with nulls as float64: each value is checked per row
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if name in ("temperature", "top_p"):
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if name == "stop":
        return _is_text(t) or (_is_list(t) and _is_text(t.value_type))
    if name == "logprobs":
        return pa.types.is_boolean(t)
    if name == "response_format":
        return _is_text(t) or pa.types.is_struct(t)
    if name == "guided_choice":
        return _is_list(t) and _is_text(t.value_type)
    if name in ("guided_regex", "logprobs_mode"):
        return _is_text(t)
    raise AssertionError(f"unknown sampling column {name!r}")


def _check_schema(path: str, schema: pa.Schema) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """The text column, the sampling columns present and the passthrough columns of a schema;
    JobInputError naming the file and column when the schema is not a valid job input."""
    names = list(schema.names)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise JobInputError(f"input file {path}: column {name!r} appears more than once")
        seen.add(name)
    for name in names:
        if name in OUTPUT_COLUMNS:
            raise JobInputError(
                f"input file {path}: column {name!r} collides with an output column "
                f"(output columns: {', '.join(OUTPUT_COLUMNS)}); rename it in the input")
    present = [c for c in TEXT_COLUMNS if c in seen]
    if not present:
        raise JobInputError(
            f"input file {path}: expected a 'prompt' column (string) or a 'messages' column "
            f"(list of struct<role: string, content: string>), found neither; "
            f"columns: {names}")
    if len(present) == 2:
        raise JobInputError(f"input file {path}: has both a 'prompt' and a 'messages' column; "
                            "expected exactly one text column")
    text_column = present[0]
    text_type = schema.field(text_column).type
    if text_column == "prompt" and not _is_text(text_type):
        raise JobInputError(f"input file {path}: column 'prompt' has type {text_type}, "
                            "expected string")
    if text_column == "messages":
        problem = _messages_problem(text_type)
        if problem:
            raise JobInputError(
                f"input file {path}: column 'messages' has type {text_type}, expected "
                f"list<struct<role: string, content: string>> ({problem})")
    for name in SAMPLING_COLUMNS:
        if name in seen:
            found = schema.field(name).type
            if not _sampling_type_ok(name, found):
                raise JobInputError(
                    f"input file {path}: column {name!r} has type {found}, expected "
                    f"{_EXPECTED_SAMPLING_TYPES[name]}")
    sampling = tuple(c for c in SAMPLING_COLUMNS if c in seen)
    passthrough = tuple(n for n in names if n not in (text_column, formats.ROW_ERROR) and n not in SAMPLING_COLUMNS)
    return text_column, sampling, passthrough


def _check_same_schema(first_path: str, first: pa.Schema, path: str, other: pa.Schema) -> None:
    """JobInputError naming both files and the first differing column unless `other` has the
    same column names with the same types as `first`, in any order (rows are read by column
    name; the output follows the column order of the first file)."""
    if len(set(other.names)) != len(other.names):
        repeated = sorted({n for n in other.names if other.names.count(n) > 1})
        raise JobInputError(f"input file {path}: column {repeated[0]!r} appears more than once")
    other_types = {field.name: field.type for field in other}
    for a in first:
        if a.name not in other_types:
            detail = f"column {a.name!r} ({a.type}) is missing from {path}"
        elif not a.type.equals(other_types[a.name]):
            detail = f"column {a.name!r} is {a.type} in {first_path} but {other_types[a.name]} in {path}"
        else:
            continue
        raise JobInputError(f"input files {first_path} and {path} have different schemas: "
                            f"{detail}; all input files must have the same columns and types")
    first_names = set(first.names)
    for b in other:
        if b.name not in first_names:
            raise JobInputError(f"input files {first_path} and {path} have different schemas: "
                                f"column {b.name!r} ({b.type}) is only in {path}; all input files "
                                "must have the same columns and types")
