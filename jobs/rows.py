"""From shards to engine requests: reading a shard's rows (`read_shard`) and turning each row
into a `Request`, or into an error for a bad row (`to_requests`)."""

from __future__ import annotations

import bisect
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ternpool.engine.requests import Request, SamplingParams

from .errors import JobInputError
from .inputs import InputSet
from .plan import Shard
from .spec import SAMPLING_COLUMNS, JobSpec, derive_seed

log = logging.getLogger(__name__)


def read_shard(inputs: InputSet, shard: Shard) -> pa.Table:
    """The rows of `shard` with an int64 `row_index` column in front. Reads only the row groups
    the shard overlaps. JobInputError naming the file and shard when they cannot be read or the
    file no longer matches its metadata at planning time."""
    if not 0 <= shard.file_index < len(inputs.files):
        raise ValueError(f"shard {shard.shard_id}: file_index {shard.file_index} out of range "
                         f"(the input set has {len(inputs.files)} files)")
    input_file = inputs.files[shard.file_index]
    where = f"input file {input_file.path}, shard {shard.shard_id} (rows {shard.row_start}.." \
            f"{shard.row_stop - 1} of the file)"
    if not 0 <= shard.row_start < shard.row_stop <= input_file.num_rows:
        raise ValueError(f"{where}: row range outside the file's {input_file.num_rows} rows")
    starts = [0, *itertools.accumulate(input_file.row_group_rows)]
    first_group = bisect.bisect_right(starts, shard.row_start) - 1
    last_group = bisect.bisect_left(starts, shard.row_stop) - 1
    groups = list(range(first_group, last_group + 1))
    try:
        with inputs.filesystem().open_input_file(input_file.path) as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.metadata
            found_groups = tuple(metadata.row_group(i).num_rows
                                 for i in range(metadata.num_row_groups))
            if found_groups != input_file.row_group_rows:
                raise JobInputError(
                    f"{where}: the file changed since the job was planned (row groups "
                    f"{list(input_file.row_group_rows)} expected, {list(found_groups)} found)")
            table = parquet.read_row_groups(groups)
    except (pa.ArrowException, OSError) as exc:
        raise JobInputError(f"{where}: cannot read: {exc}") from None
    table = table.slice(shard.row_start - starts[first_group], shard.num_rows)
    if table.num_rows != shard.num_rows:
        raise JobInputError(f"{where}: read {table.num_rows} rows, expected {shard.num_rows}")
    row_index = pa.array(range(shard.first_row_index, shard.first_row_index + shard.num_rows),
                         pa.int64())
    return table.add_column(0, pa.field("row_index", pa.int64(), nullable=False), row_index)


@dataclass(frozen=True)
class RowRequest:
    """What one input row becomes: an engine request, or the reason it cannot be one."""

    row_index: int
    request: Request | None  # None when the row is bad
    error: str | None  # the reason, naming the row_index and column


def to_requests(table: pa.Table, spec: JobSpec, text_column: str) -> list[RowRequest]:
    """One `RowRequest` per row of a `read_shard` table, in order. The request key is the
    row_index; sampling parameters are the job defaults overridden by the row's non-null
    sampling columns; a row without a seed gets `derive_seed(spec.seed, row_index)`.
    A bad row (null or empty prompt, empty or incomplete messages, impossible sampling values)
    becomes a RowRequest with `error` set instead of an exception."""
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
    defaults = spec.sampling_defaults()
    defaults["stop"] = tuple(defaults["stop"])
    out: list[RowRequest] = []
    for i, row_index in enumerate(row_indices):
        if row_index is None:
            raise ValueError(f"to_requests: row {i} of the table has a null row_index")
        row_overrides = {name: values[i] for name, values in overrides.items()
                         if values[i] is not None}
        text, error = _text_of(row_index, text_column, texts[i])
        params = None
        if error is None:
            params, error = _params_of(row_index, defaults, row_overrides, spec.seed)
        if error is not None:
            out.append(RowRequest(row_index, None, error))
            continue
        if text_column == "prompt":
            request = Request(key=row_index, prompt=text, params=params)
        else:
            request = Request(key=row_index, messages=text, params=params)
        out.append(RowRequest(row_index, request, None))
    return out


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


def _params_of(row_index: int, defaults: dict[str, Any], overrides: dict[str, Any],
               job_seed: int) -> tuple[SamplingParams | None, str | None]:
    """The row's SamplingParams, or an error naming the offending column."""
    values = dict(defaults)
    values.update(overrides)
    if "stop" in overrides:
        stop = overrides["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    if "seed" not in overrides:
        values["seed"] = derive_seed(job_seed, row_index)
    try:
        return SamplingParams(**values), None
    except ValueError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        column = field if field in SAMPLING_COLUMNS else next(iter(overrides), "?")
        return None, f"row {row_index}: column {column!r}: {message}"
