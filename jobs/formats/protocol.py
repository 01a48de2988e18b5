"""What an input format is: the `InputFormat` protocol every format implements, and the
`FileLayout` it reads from one file (rows, chunk boundaries, schema).

A chunk is the unit a format reads cheaply on its own (a Parquet row group, a byte range of a
JSON Lines file, ...). Shards follow chunks; the rest of ternpool knows nothing else about a
format. Formats are registered in `ternpool.jobs.formats`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs


# A column a format may add: non-null when the row cannot become a request (its reason, naming the
# line and field). `rows.to_requests` makes such a row an error row; it is never passed through.
ROW_ERROR = "_ternpool_row_error"


@dataclass(frozen=True)
class FileLayout:
    """One input file as its format describes it, before any row is read."""

    num_rows: int
    chunk_rows: tuple[int, ...]  # rows in each chunk, in file order (they add up to num_rows)
    schema: pa.Schema
    # the file's request keys (OpenAI's custom_id) -> their line, when the format has them: a key used
    # in two files of one job is refused (`inputs.open_inputs`)
    keys: dict[str, int] | None = field(default=None, compare=False, repr=False)


class InputFormat(Protocol):
    """One file format ternpool reads prompts from. An instance is stateless, shared by every file
    of its format, and found again by `name` (which `InputFile.format` records), also in the
    coordinator's process."""

    name: str  # the registry key, e.g. "parquet"
    label: str  # what messages call its files, e.g. "Parquet"
    suffixes: tuple[str, ...]  # the names a directory listing takes as this format, e.g. (".parquet",)

    # A format that shares a suffix with another also has `claims(first) -> bool`: True when it
    # reads a file whose first line (parsed JSON) is `first` (see `formats.detect`).

    def describe(self, fs: pafs.FileSystem, path: str, size: int) -> FileLayout:
        """Rows, chunk boundaries and schema of the file at `path` (`size` bytes, -1 when the
        filesystem does not say), reading as little of it as the format allows. JobInputError
        naming `path` when it is not a readable file of this format."""
        ...

    def read_chunks(self, fs: pafs.FileSystem, path: str, chunk_rows: tuple[int, ...],
                    chunks: list[int], read_ahead: int) -> tuple[pa.Table, list[int]]:
        """Chunks `chunks` (consecutive indices, ascending) of the file at `path` as one table, and
        after them, when `read_ahead` > 0 and the format can tell, the following chunks while they
        add up to at most `read_ahead` bytes. Returns the table and the chunks it holds, in order.

        `chunk_rows` is the layout `describe` found when the job was planned: JobInputError saying
        what differs when the file no longer has it. The caller names the file and shard in front of
        a JobInputError's message and wraps pyarrow errors and OSError, so neither needs `path`."""
        ...
