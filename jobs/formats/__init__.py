"""The input formats ternpool reads, registered in one place.

A format is a module in this package implementing `InputFormat` (see `protocol.py`) plus one
`register(...)` line at the bottom of this file. A directory yields the files whose names end in a
registered suffix (case matters); a file named explicitly (or matched by a glob) whose suffix no format claims is
read as the first registered format, Parquet."""

from __future__ import annotations

from .parquet import ParquetFormat
from .protocol import FileLayout, InputFormat

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


def is_listed(name: str) -> bool:
    """True when a directory listing takes a file called `name` as an input."""
    return any(name.endswith(suffix) for f in FORMATS.values() for suffix in f.suffixes)


def labels() -> str:
    """The registered formats as messages name them: 'Parquet', 'Parquet or JSON Lines'."""
    names = [f.label for f in FORMATS.values()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


register(ParquetFormat())

__all__ = ["FORMATS", "FileLayout", "InputFormat", "is_listed", "labels", "named", "of_path", "register"]
