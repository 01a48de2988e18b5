"""From shards to engine requests: reading a shard's rows from the chunks of its input file
(`read_shard`, through the file's format) and turning each row into a `Request`, or into an
error for a bad row (`to_requests`)."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from ternpool.engine.requests import CONSTRAINT_FIELDS, Request, SamplingParams, SamplingValueError

from . import formats
from .errors import JobInputError
from .inputs import INTEGER_SAMPLING_COLUMNS, InputSet
from .plan import Shard
from .spec import SAMPLING_COLUMNS, JobSpec, derive_seed

log = logging.getLogger(__name__)


def read_shard(inputs: InputSet, shard: Shard, cache: "ChunkCache | None" = None) -> pa.Table:
    """The rows of `shard` with an int64 `row_index` column in front. Reads only the chunks
    the shard overlaps (from `cache` when it holds them). JobInputError naming the file and shard
    when they cannot be read or the file no longer matches its metadata at planning time."""
    if not 0 <= shard.file_index < len(inputs.files):
        raise ValueError(f"shard {shard.shard_id}: file_index {shard.file_index} out of range "
                         f"(the input set has {len(inputs.files)} files)")
    input_file = inputs.files[shard.file_index]
    where = f"input file {input_file.path}, shard {shard.shard_id} (rows {shard.row_start}.." \
            f"{shard.row_stop - 1} of the file)"
    if not 0 <= shard.row_start < shard.row_stop <= input_file.num_rows:
        raise ValueError(f"{where}: row range outside the file's {input_file.num_rows} rows")
    starts = [0, *itertools.accumulate(input_file.chunk_rows)]
    first_chunk = bisect.bisect_right(starts, shard.row_start) - 1
    last_chunk = bisect.bisect_left(starts, shard.row_stop) - 1
    chunks = list(range(first_chunk, last_chunk + 1))
    if cache is None:
        table = _read_chunks(inputs, shard.file_index, chunks, where)[0]
    else:
        table = cache.get(inputs, shard.file_index, chunks, where)
    table = _conform(table.slice(shard.row_start - starts[first_chunk], shard.num_rows), inputs.schema)
    if table.num_rows != shard.num_rows:
        raise JobInputError(f"{where}: read {table.num_rows} rows, expected {shard.num_rows}")
    row_index = pa.array(range(shard.first_row_index, shard.first_row_index + shard.num_rows),
                         pa.int64())
    return table.add_column(0, pa.field("row_index", pa.int64(), nullable=False), row_index)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with the planned `schema`: its columns in that order (another file may have them in
    another), cast to the planned types, and a column missing from this chunk as nulls (a text
    format's chunk has the fields its own lines have)."""
    if table.schema.equals(schema):
        return table
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _read_chunks(inputs: InputSet, file_index: int, chunks: list[int], where: str,
                 read_ahead: int = 0) -> tuple[pa.Table, list[int]]:
    """Chunks `chunks` of one input file, and after them (when `read_ahead` > 0) the following
    chunks while they add up to at most `read_ahead` bytes, read by the file's format
    (`InputFormat.read_chunks`). Returns the table and the chunks it holds, in order; errors
    become JobInputErrors that start with `where` (the file and shard)."""
    input_file = inputs.files[file_index]
    input_format = formats.named(input_file.format)
    fs = inputs.filesystem()
    try:
        return input_format.read_chunks(fs, input_file.path, input_file.chunk_rows, chunks, read_ahead)
    except JobInputError as exc:
        raise JobInputError(f"{where}: {exc}") from None
    except (pa.ArrowException, OSError) as exc:
        raise JobInputError(f"{where}: cannot read: {exc}") from None


class ChunkCache:
    """The chunks read last, kept up to `max_bytes`: shards are handed out in order, so the shards
    of one large chunk (a Parquet file written with pyarrow's default of a million rows per row group
    is a single chunk) read it once instead of once each. Thread-safe."""

    def __init__(self, max_bytes: int = 256 << 20, read_ahead: int = 8 << 20):
        self.max_bytes, self.read_ahead = max_bytes, read_ahead
        self._tables: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, inputs: InputSet, file_index: int, chunks: list[int], where: str) -> pa.Table:
        with self._lock:
            missing = [c for c in chunks if (file_index, c) not in self._tables]
            if missing:
                # the chunks after a shard's are the next shards': read small ones ahead with it
                ahead = self.read_ahead if missing[-1] == chunks[-1] else 0
                table, read = _read_chunks(inputs, file_index, missing, where, ahead)
                offset = 0
                for c in read:
                    n = inputs.files[file_index].chunk_rows[c]
                    if (file_index, c) not in self._tables:
                        self._put((file_index, c), table.slice(offset, n))
                    offset += n
            parts = []
            for c in chunks:
                self._tables.move_to_end((file_index, c))
                parts.append(self._tables[(file_index, c)])
            self._evict(keep=len(chunks))
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def _put(self, key: tuple[int, int], table: pa.Table) -> None:
        self._tables[key] = table
        self._bytes += table.nbytes

    def _evict(self, keep: int) -> None:
        while self._bytes > self.max_bytes and len(self._tables) > keep:
            _, table = self._tables.popitem(last=False)
            self._bytes -= table.nbytes


@dataclass(frozen=True)
class RowRequest:
    """What one input row becomes: an engine request, or the reason it cannot be one."""

    row_index: int
    request: Request | None  # None when the row is bad
    error: str | None  # the reason, naming the row_index and column


def to_requests(table: pa.Table, spec: JobSpec, text_column: str) -> list[RowRequest]:
    """One `RowRequest` per row of a `read_shard` table, in order. The request key is the
    row_index; sampling parameters are the job defaults overridden by the row's non-null
    sampling columns; a row without a seed gets `derive_seed(job seed, row_index)`.
    A bad row (null or empty prompt, empty or incomplete messages, impossible sampling values, a
    reason in the `formats.ROW_ERROR` column) becomes a RowRequest with `error` set instead of an exception."""
    for needed in ("row_index", text_column):
        if needed not in table.column_names:
            raise ValueError(f"to_requests: the table has no {needed!r} column "
                             f"(columns: {table.column_names})")
    if text_column not in ("prompt", "messages"):
        raise ValueError(f"to_requests: text_column must be 'prompt' or 'messages', "
                         f"got {text_column!r}")
    row_indices = table.column("row_index").to_pylist()
    texts = table.column(text_column).to_pylist()
    overrides = {name: table.column(name).to_pylist()
                 for name in SAMPLING_COLUMNS if name in table.column_names}
    format_errors = table.column(formats.ROW_ERROR).to_pylist() if formats.ROW_ERROR in table.column_names \
        else [None] * table.num_rows
    out: list[RowRequest] = []
    for i, row_index in enumerate(row_indices):
        if row_index is None:
            raise ValueError(f"to_requests: row {i} of the table has a null row_index")
        if format_errors[i] is not None:  # found by the input format while reading the row
            out.append(RowRequest(row_index, None, f"row {row_index}: {format_errors[i]}"))
            continue
        try:
            out.append(_row_request(row_index, text_column, texts[i], spec.sampling,
                                    {name: values[i] for name, values in overrides.items() if values[i] is not None}))
        except Exception as exc:  # any surprise in one row is that row's error, not the shard's
            log.warning("row %d cannot be converted to a request: %s: %s", row_index, type(exc).__name__, exc)
            out.append(RowRequest(row_index, None, f"row {row_index}: {type(exc).__name__}: {exc}"))
    return out


def _row_request(row_index: int, text_column: str, value: Any, defaults: SamplingParams,
                 row_overrides: dict[str, Any]) -> RowRequest:
    text, error = _text_of(row_index, text_column, value)
    params = None
    if error is None:
        params, error = _params_of(row_index, defaults, row_overrides)
    if error is not None:
        return RowRequest(row_index, None, error)
    if text_column == "prompt":
        return RowRequest(row_index, Request(key=row_index, prompt=text, params=params), None)
    return RowRequest(row_index, Request(key=row_index, messages=text, params=params), None)


def _text_of(row_index: int, column: str, value: Any) -> tuple[Any, str | None]:
    """The prompt string or the list of {"role", "content"} dicts of a row, or an error."""
    where = f"row {row_index}: column {column!r}"
    if value is None:
        return None, f"{where} is null"
    if column == "prompt":
        if value == "":
            return None, f"{where} is an empty string"
        return value, None
    if len(value) == 0:
        return None, f"{where} is an empty list of messages"
    messages = []
    for j, message in enumerate(value):
        if message is None:
            return None, f"{where}: message {j} is null"
        for key in ("role", "content"):
            if message.get(key) is None:
                return None, f"{where}: message {j} has a null {key!r}"
        messages.append({"role": message["role"], "content": message["content"]})
    return messages, None


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _params_of(row_index: int, defaults: SamplingParams,
               overrides: dict[str, Any]) -> tuple[SamplingParams | None, str | None]:
    """The row's SamplingParams (the job's `defaults` with the row's non-null sampling columns;
    defaults.seed is the job seed), or an error naming the offending column."""
    values = dict(overrides)
    for name in INTEGER_SAMPLING_COLUMNS:
        value = overrides.get(name)
        if isinstance(value, float):  # a float column (pandas writes ints with nulls as float64)
            if not math.isfinite(value) or not value.is_integer():
                return None, f"row {row_index}: column {name!r} is {value!r}, expected an integer"
            values[name] = int(value)
    if "stop" in overrides:
        stop = overrides["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if "seed" not in overrides:
        values["seed"] = derive_seed(defaults.seed, row_index)
    if isinstance(values.get("response_format"), dict):  # a struct column: its absent fields read as null
        values["response_format"] = _without_nulls(values["response_format"])
    if any(name in overrides for name in CONSTRAINT_FIELDS):  # a row's constraint replaces the job's
        values = {name: None for name in CONSTRAINT_FIELDS} | values
    try:
        return replace(defaults, **values), None
    except SamplingValueError as exc:
        return None, f"row {row_index}: column {exc.field!r}: {exc}"
