"""The output side of a job: one output row per input row (`result_table`), part files written
atomically (`write_part`) and the finished output read back in input order (`read_output`)."""

from __future__ import annotations

import logging
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ternpool.engine.requests import Result

from . import storage
from .errors import JobInputError
from .storage import part_name

log = logging.getLogger(__name__)

# a token's log-probability and the most likely tokens at its position (engine.requests.TokenLogprob)
TOP_LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
TOKEN_LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
                                ("top_logprobs", pa.list_(TOP_LOGPROB_TYPE))])

OUTPUT_SCHEMA_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("row_index", pa.int64()),
    ("generated_text", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),
    # null for rows that did not ask (logprobs / top_logprobs, prompt_logprobs)
    ("generated_logprobs", pa.list_(TOKEN_LOGPROB_TYPE)),
    ("prompt_token_logprobs", pa.list_(TOKEN_LOGPROB_TYPE)),  # the first prompt token's logprob is null
)
_OUTPUT_TYPES = dict(OUTPUT_SCHEMA_FIELDS)
OUTPUT_COLUMNS = tuple(_OUTPUT_TYPES)  # an input column of one of these names is refused
# the columns of TokenLogprob lists (a logprob of -inf stays -inf here; JSON writers floor it)
LOGPROB_COLUMNS = tuple(name for name, t in OUTPUT_SCHEMA_FIELDS if t == pa.list_(TOKEN_LOGPROB_TYPE))

__all__ = ["OUTPUT_COLUMNS", "OUTPUT_SCHEMA_FIELDS", "error_results", "part_name",
           "read_complete_output", "read_output",
           "result_table", "write_part"]


def result_table(shard_table: pa.Table, results: dict[int, Result],
                 passthrough: tuple[str, ...]) -> pa.Table:
    """The output rows of a shard, one per row of `shard_table` (a `read_shard` table) in its
    order: `row_index`, the passthrough columns unchanged, then generated_text, finish_reason,
    prompt_tokens, completion_tokens, error, generated_logprobs and prompt_token_logprobs. `results` maps row_index -> Result; a row
    without a result raises ValueError (rows are never dropped). A failed result has
    generated_text "" and finish_reason "error". Results for other rows are ignored."""
    if "row_index" not in shard_table.column_names:
        raise ValueError(f"result_table: the shard table has no 'row_index' column "
                         f"(columns: {shard_table.column_names})")
    missing_columns = [c for c in passthrough if c not in shard_table.column_names]
    if missing_columns:
        raise ValueError(f"result_table: passthrough column(s) {missing_columns} are not in the "
                         f"shard table (columns: {shard_table.column_names})")
    row_indices = shard_table.column("row_index").to_pylist()
    missing = [r for r in row_indices if r not in results]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"result_table: no result for {len(missing)} of {len(row_indices)} "
                         f"row(s): row_index {shown}")
    texts, reasons, prompt_tokens, completion_tokens, errors = [], [], [], [], []
    generated_logprobs, prompt_token_logprobs = [], []
    for row_index in row_indices:
        result = results[row_index]
        failed = result.error is not None or result.finish_reason == "error"
        texts.append("" if failed else (result.text or ""))
        reasons.append("error" if failed else result.finish_reason)
        prompt_tokens.append(int(result.prompt_tokens))
        completion_tokens.append(int(result.completion_tokens))
        if failed and result.error is None:
            errors.append("the engine reported finish_reason 'error' without a message")
        else:
            errors.append(result.error)
        generated_logprobs.append(_logprob_rows(result.logprobs))
        prompt_token_logprobs.append(_logprob_rows(result.prompt_logprobs))
    fields = [pa.field("row_index", pa.int64(), nullable=False)]
    columns: list[pa.ChunkedArray | pa.Array] = [shard_table.column("row_index").cast(pa.int64())]
    for name in passthrough:
        column = shard_table.column(name)
        fields.append(shard_table.schema.field(name))
        columns.append(column)
    for name, values in (("generated_text", texts), ("finish_reason", reasons),
                         ("prompt_tokens", prompt_tokens),
                         ("completion_tokens", completion_tokens), ("error", errors),
                         ("generated_logprobs", generated_logprobs),
                         ("prompt_token_logprobs", prompt_token_logprobs)):
        fields.append(pa.field(name, _OUTPUT_TYPES[name]))
        columns.append(pa.array(values, _OUTPUT_TYPES[name]))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _logprob_rows(logprobs: tuple | None) -> list[dict] | None:
    """TokenLogprobs as TOKEN_LOGPROB_TYPE values (None stays None: the row did not ask)."""
    if logprobs is None:
        return None
    return [t.to_dict() for t in logprobs]


def error_results(row_indices: Iterable[int], message: str) -> dict[int, Result]:
    """A failed Result for each row (for rows that failed on every try)."""
    return {int(r): Result.failed(int(r), message) for r in row_indices}


def write_part(output: str, shard_id: int, table: pa.Table) -> str:
    """Write one shard's output to `output/part-{shard_id:05d}.parquet`: first to a temporary
    name in the same directory, then renamed, so a part file is either absent or complete.
    Creates the directory. Returns the final path (as the output's filesystem knows it)."""
    fs, base = storage.resolve(output)
    path = storage.join(base, part_name(shard_id))
    storage.write_atomic(fs, path, lambda stream: pq.write_table(table, stream))
    log.debug("wrote %s (%d rows)", path, table.num_rows)
    return path


def read_output(output: str) -> pa.Table:
    """The output of a job as one table ordered like the input (by row_index): every part file
    the manifest lists as complete, and nothing else. JobInputError when there is no manifest
    or a listed part is missing or does not hold the recorded number of rows."""
    from .manifest import Manifest  # manifest -> storage; imported here to keep modules apart

    manifest = Manifest.load(output)
    fs, base = storage.resolve(output)
    if len(manifest.completed) < manifest.num_shards:
        log.warning("output %s is incomplete: %d of %d shards done", output,
                    len(manifest.completed), manifest.num_shards)
    tables = []
    for shard_id in sorted(manifest.completed):
        entry = manifest.completed[shard_id]
        path = storage.join(base, entry.get("file") or part_name(shard_id))
        try:
            with fs.open_input_file(path) as handle:
                table = pq.read_table(handle)
        except FileNotFoundError:
            raise JobInputError(f"output part {path} of shard {shard_id} is listed in the "
                                "manifest but missing") from None
        except (pa.ArrowException, OSError) as exc:
            raise JobInputError(f"output part {path} of shard {shard_id} cannot be read: "
                                f"{exc}") from None
        if "rows" in entry and table.num_rows != entry["rows"]:
            raise JobInputError(f"output part {path} of shard {shard_id} holds {table.num_rows} "
                                f"rows; the manifest recorded {entry['rows']}")
        tables.append(table)
    if not tables:
        return pa.schema([pa.field(n, t) for n, t in OUTPUT_SCHEMA_FIELDS]).empty_table()
    return pa.concat_tables(tables, promote_options="default").sort_by("row_index")


def read_complete_output(output: str):
    """`(manifest, read_output(output))` of a job whose every row is written; JobInputError saying
    so when the job is not complete."""
    from .manifest import Manifest

    manifest = Manifest.load(output)
    table = read_output(output)
    if table.num_rows != manifest.num_rows:
        raise JobInputError(f"output {output} holds {table.num_rows} of the job's {manifest.num_rows} rows: "
                            "the job is not complete (rerun its submit command to finish it)")
    return manifest, table
