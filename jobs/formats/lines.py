"""Reading line-delimited JSON files (JSON Lines, OpenAI Batch files) a chunk at a time.

A file's chunk `i` holds the lines that *start* in bytes [i * chunk_bytes, (i + 1) * chunk_bytes),
so a shard reads only its byte range (seek, skip the line begun before it, read until the next
chunk's first line). Blank lines are skipped and are not rows; every error names the 1-based
line number (a chunk read on its own counts from the number its caller gives)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from ..errors import JobInputError

CHUNK_BYTES = 1 << 20  # bytes of a chunk: a shard of a JSON Lines file reads at least this much
MAX_LINE_BYTES = 16 << 20  # a longer line is refused (a file with no newline is not JSON Lines)
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line number in the file (see the module docstring for chunks)
    offset: int  # byte offset of its first byte
    value: Any  # the parsed JSON value


def _lines(stream, start: int, stop: int | None, first_number: int) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset, bytes without the newline) of the lines of `stream` (positioned at
    byte `start`) that start before `stop` (None: the end), one block read at a time."""
    tail = b""  # the unfinished line at the end of the blocks read so far
    offset, number = start, first_number
    while True:
        block = stream.read(_BLOCK)
        buffer, pos = tail + block, 0
        while (end := buffer.find(b"\n", pos)) >= 0:
            if stop is not None and offset >= stop:
                return
            if end - pos > MAX_LINE_BYTES:
                raise _too_long(number)
            yield number, offset, buffer[pos:end]
            offset += end - pos + 1
            number += 1
            pos = end + 1
        tail = buffer[pos:]
        if len(tail) > MAX_LINE_BYTES:
            raise _too_long(number)
        if not block:
            if tail and (stop is None or offset < stop):
                yield number, offset, tail
            return


def _too_long(number: int) -> JobInputError:
    return JobInputError(f"line {number} is longer than {MAX_LINE_BYTES:,} bytes, the most ternpool reads as one "
                         "line (not a JSON Lines file?)")


def parse(number: int, raw: bytes) -> Any:
    """The JSON value of one line; JobInputError naming the line when it is not UTF-8 or JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobInputError(f"line {number} is not valid UTF-8 (byte {exc.start}: "
                            f"{raw[exc.start:exc.start + 1]!r})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JobInputError(f"line {number} is not valid JSON: {exc.msg} at column {exc.colno}"
                            + (" (one JSON object per line is expected, not a JSON array)"
                               if text.strip() == "[" else "")) from None
    except RecursionError:
        raise JobInputError(f"line {number} nests JSON too deeply") from None


def parsed(lines: Iterator[tuple[int, int, bytes]]) -> Iterator[Line]:
    for number, offset, raw in lines:
        if raw.strip():
            yield Line(number, offset, parse(number, raw))


def scan(fs: pafs.FileSystem, path: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, Line]]:
    """(chunk index, line) of every non-blank line of the whole file, in order."""
    with fs.open_input_stream(path) as stream:
        for line in parsed(_lines(stream, 0, None, 1)):
            yield line.offset // chunk_bytes, line


def read_range(fs: pafs.FileSystem, path: str, first_chunk: int, stop_chunk: int,
               chunk_bytes: int = CHUNK_BYTES, first_number: int = 1) -> list[Line]:
    """The non-blank lines of chunks [first_chunk, stop_chunk), numbered from `first_number` (the
    file's line number of the range's first line, when the caller knows it)."""
    start, stop = first_chunk * chunk_bytes, stop_chunk * chunk_bytes
    with fs.open_input_file(path) as handle:
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":  # the line begun before `start` belongs to the chunk before
                skipped = next(_lines(handle, start, None, 1), None)
                if skipped is None:
                    return []
                start += len(skipped[2]) + 1
                handle.seek(start)
        return list(parsed(_lines(handle, start, stop, first_number)))


def chunk_rows(counts: dict[int, int]) -> tuple[int, ...]:
    """Rows per chunk, chunks without a line start included as 0, from {chunk: rows}."""
    return tuple(counts.get(i, 0) for i in range(max(counts) + 1)) if counts else ()


def type_name(value: Any) -> str:
    """What JSON calls a Python value from json.loads."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
