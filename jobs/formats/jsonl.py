"""JSON Lines input files: one JSON object per line with the columns a Parquet input has (`prompt`
or `messages`, optional `id`, per-row sampling fields, any other field passed through). Chunks are
byte ranges of lines (`lines.py`).

Types: `prompt` string; `messages` a list of {"role", "content"} strings; `max_tokens`, `top_k`,
`seed` integers; `temperature`, `top_p` numbers; `stop` a string or a list of strings (read as a
list); `logprobs_mode` a string. Another field is a string, integer, number (integers and numbers
mix) or boolean column; an object or array field passes through as its JSON text. A field missing
from a line is null."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import JobInputError
from . import lines
from .protocol import FileLayout

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
STOP_TYPE = pa.list_(pa.string())
_KNOWN: dict[str, tuple[pa.DataType, tuple[type, ...], str]] = {  # column -> (type, accepted, expected)
    "prompt": (pa.string(), (str,), "a string"),
    "max_tokens": (pa.int64(), (int,), "an integer"),
    "top_k": (pa.int64(), (int,), "an integer"),
    "seed": (pa.int64(), (int,), "an integer"),
    "temperature": (pa.float64(), (int, float), "a number"),
    "top_p": (pa.float64(), (int, float), "a number"),
    "guided_regex": (pa.string(), (str,), "a string"),
    "logprobs_mode": (pa.string(), (str,), "a string"),
    "response_format": (pa.string(), (str, dict), "an object or its JSON text"),  # kept as JSON text
}
_SCALAR_TYPES = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}


def check_field(number: int, name: str, value: Any) -> None:
    """JobInputError naming the line and field when a known field has the wrong JSON type."""
    if value is None:
        return
    if name in _KNOWN:
        _, accepted, expected = _KNOWN[name]
        if isinstance(value, accepted) and not isinstance(value, bool):
            return
    elif name == "messages":
        if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str) for m in value):
            return
        expected = 'a list of {"role": string, "content": string} objects'
    elif name == "stop":
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            return
        expected = "a string or a list of strings"
    elif name == "guided_choice":
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return
        expected = "a list of strings"
    else:
        return
    raise JobInputError(f"line {number}: field {name!r} is {lines.type_name(value)}, expected {expected}")


class _Columns:
    """The Arrow type of every field seen so far, widened line by line (int and float make float)."""

    def __init__(self):
        self.types: dict[str, pa.DataType] = {}

    def add(self, number: int, row: dict) -> None:
        for name, value in row.items():
            check_field(number, name, value)
            if value is None:
                self.types.setdefault(name, pa.null())
                continue
            found = _type_of(name, value)
            known = self.types.get(name)
            if known is None or pa.types.is_null(known):
                self.types[name] = found
            elif not known.equals(found):
                if {str(known), str(found)} == {"int64", "double"}:
                    self.types[name] = pa.float64()
                else:
                    raise JobInputError(f"line {number}: field {name!r} is {lines.type_name(value)} "
                                        f"({found}) but earlier lines have {known}; a field keeps one type")

    def schema(self) -> pa.Schema:
        return pa.schema([(name, t) for name, t in self.types.items()])


def _type_of(name: str, value: Any) -> pa.DataType:
    if name in _KNOWN:
        return _KNOWN[name][0]
    if name == "messages":
        return MESSAGES_TYPE
    if name in ("stop", "guided_choice"):
        return STOP_TYPE
    if isinstance(value, (dict, list)):
        return pa.string()  # passed through as JSON text
    return _SCALAR_TYPES[type(value)]


def _value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "stop":
        return [value] if isinstance(value, str) else value
    if name == "guided_choice":
        return value
    if name == "messages":
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return value


def _object(line: lines.Line) -> dict:
    if not isinstance(line.value, dict):
        raise JobInputError(f"line {line.number} is {lines.type_name(line.value)}, expected a JSON object")
    return line.value


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (parsed objects) as a table of `schema`'s columns (a missing field is null)."""
    return pa.table({f.name: pa.array([_value(f.name, r.get(f.name)) for r in rows], f.type) for f in schema},
                    schema=schema)


class JsonLinesFormat:
    """`InputFormat` for JSON Lines: chunks of `chunk_bytes` bytes of lines."""

    name = "jsonl"
    label = "JSON Lines"
    suffixes = (".jsonl", ".ndjson")

    def __init__(self, chunk_bytes: int = lines.CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def claims(self, first: Any) -> bool:
        return True

    def describe(self, fs: pafs.FileSystem, path: str, size: int) -> FileLayout:
        counts: dict[int, int] = {}
        columns = _Columns()
        try:
            for chunk, line in lines.scan(fs, path, self.chunk_bytes):
                columns.add(line.number, _object(line))
                counts[chunk] = counts.get(chunk, 0) + 1
        except JobInputError as exc:
            raise JobInputError(f"input file {path}: {exc}") from None
        if not counts:
            raise JobInputError(f"input file {path} has no JSON lines (it is empty or blank)")
        return FileLayout(sum(counts.values()), lines.chunk_rows(counts), columns.schema())

    def read_chunks(self, fs: pafs.FileSystem, path: str, chunk_rows: tuple[int, ...],
                    chunks: list[int], read_ahead: int) -> tuple[pa.Table, list[int]]:
        """Chunks `chunks` (no read-ahead: each chunk is a byte range already). The table has the
        fields of these lines; the caller conforms it to the planned schema."""
        found = lines.read_range(fs, path, chunks[0], chunks[-1] + 1, self.chunk_bytes)
        expected = sum(chunk_rows[c] for c in chunks)
        if len(found) != expected:
            raise JobInputError(f"the file changed since the job was planned ({expected} lines expected "
                                f"in chunks {chunks[0]}..{chunks[-1]}, {len(found)} found)")
        columns = _Columns()
        rows = []
        for line in found:
            rows.append(_object(line))
            columns.add(line.number, rows[-1])
        return to_table(rows, columns.schema()), list(chunks)
