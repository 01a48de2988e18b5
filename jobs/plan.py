"""Cutting a job into shards: contiguous row ranges of one file that follow its chunks (the units
its format reads on their own: Parquet row groups, ...)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .inputs import InputSet


@dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_stop) of input file `file_index`; the first of them has the global
    `first_row_index`."""

    shard_id: int
    file_index: int  # into InputSet.files
    row_start: int  # first row within the file
    row_stop: int  # one past the last row within the file
    first_row_index: int  # global row_index of row_start

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


def plan_shards(inputs: InputSet, shard_rows: int) -> list[Shard]:
    """The shards of a job, deterministically, with shard_ids 0..n-1 in row_index order.

    Shards never cross a file and follow chunks: consecutive small chunks are merged while the
    total stays within `shard_rows`; a chunk larger than `shard_rows` is cut into ranges of
    `shard_rows` rows (the last one shorter). Files and chunks without rows make no shards."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows must be an integer >= 1, got {shard_rows!r}")
    shards: list[Shard] = []
    file_offset = 0
    for file_index, input_file in enumerate(inputs.files):
        if sum(input_file.chunk_rows) != input_file.num_rows:
            raise ValueError(f"input file {input_file.path}: chunks hold "
                             f"{sum(input_file.chunk_rows)} rows but the file has "
                             f"{input_file.num_rows}")
        for start, stop in _file_ranges(input_file.chunk_rows, shard_rows):
            shards.append(Shard(len(shards), file_index, start, stop, file_offset + start))
        file_offset += input_file.num_rows
    return shards


def _file_ranges(chunk_rows: tuple[int, ...], shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of one file that follow its chunks."""
    ranges: list[tuple[int, int]] = []
    pending: tuple[int, int] | None = None  # merged small chunks not yet emitted
    chunk_start = 0
    for rows in chunk_rows:
        chunk_stop = chunk_start + rows
        if rows == 0:
            pass
        elif rows > shard_rows:
            if pending:
                ranges.append(pending)
                pending = None
            ranges.extend((s, min(s + shard_rows, chunk_stop))
                          for s in range(chunk_start, chunk_stop, shard_rows))
        elif pending and pending[1] - pending[0] + rows <= shard_rows:
            pending = (pending[0], chunk_stop)
        else:
            if pending:
                ranges.append(pending)
            pending = (chunk_start, chunk_stop)
        chunk_start = chunk_stop
    if pending:
        ranges.append(pending)
    return ranges


def split_shard(shard: Shard, parts: int = 2) -> list[Shard]:
    """`shard` cut into up to `parts` contiguous pieces of near-equal size (never empty ones),
    e.g. to isolate a row that fails on every try. The pieces keep `shard_id`: the caller
    renumbers or labels them."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    parts = max(1, min(parts, shard.num_rows))
    base, extra = divmod(shard.num_rows, parts)
    pieces = []
    start = shard.row_start
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        pieces.append(replace(shard, row_start=start, row_stop=stop,
                              first_row_index=shard.first_row_index + (start - shard.row_start)))
        start = stop
    return pieces
