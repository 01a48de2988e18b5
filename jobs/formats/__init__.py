"""The input formats ternpool reads, registered in one place.

A format is a module in this package implementing `InputFormat` (see `protocol.py`) plus one
`register(...)` line at the bottom of this file. A directory yields the files whose names end in a
registered suffix (case matters); a file named explicitly (or matched by a glob) whose suffix no format claims is
read as the first registered format, Parquet. When several formats share a suffix (`.jsonl`: OpenAI Batch
and JSON Lines), the first line decides: the first of them whose `claims(first line)` is true."""

from __future__ import annotations

import pyarrow.fs as pafs

from ..errors import JobInputError
from . import lines
from .jsonl import JsonLinesFormat
from .openai_batch import OpenAIBatchFormat
from .parquet import ParquetFormat
from .protocol import ROW_ERROR, FileLayout, InputFormat

FORMATS: dict[str, InputFormat] = {}  # by name, in registration order (the first is the default)


def register(input_format: InputFormat) -> InputFormat:
    """Make `input_format` readable under its name and suffixes."""
    FORMATS[input_format.name] = input_format
    return input_format


def named(name: str) -> InputFormat:
    """The format registered as `name` (what `InputFile.format` records)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown input format {name!r} (registered: {', '.join(FORMATS)})") from None


def of_path(path: str) -> InputFormat:
    """The format of the file at `path`: the one whose suffix ends it, else the default."""
    for input_format in FORMATS.values():
        if any(path.endswith(suffix) for suffix in input_format.suffixes):
            return input_format
    return next(iter(FORMATS.values()))


def detect(fs: pafs.FileSystem, path: str) -> InputFormat:
    """The format of the file at `path`: by suffix (`of_path`), and by its first line when several
    formats share the suffix."""
    candidates = [f for f in FORMATS.values() if any(path.endswith(s) for s in f.suffixes)]
    if len(candidates) <= 1:
        return of_path(path)
    try:
        first = next(lines.scan(fs, path), None)
    except (JobInputError, OSError):  # the last candidate's describe says what is wrong with it
        return candidates[-1]
    return next((f for f in candidates if first is not None and f.claims(first[1].value)), candidates[-1])


def is_listed(name: str) -> bool:
    """True when a directory listing takes a file called `name` as an input."""
    return any(name.endswith(suffix) for f in FORMATS.values() for suffix in f.suffixes)


def labels() -> str:
    """The registered formats as messages name them: 'Parquet', 'Parquet or JSON Lines'."""
    names = [f.label for f in FORMATS.values()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


register(ParquetFormat())
register(OpenAIBatchFormat())  # before JSON Lines: both read .jsonl, the first line decides
register(JsonLinesFormat())

__all__ = ["FORMATS", "ROW_ERROR", "FileLayout", "InputFormat", "detect", "is_listed", "labels", "named", "of_path",
           "register"]
