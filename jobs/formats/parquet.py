"""Parquet input files: a file's chunks are its row groups, described from the footer alone."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..errors import JobInputError
from .protocol import FileLayout


def _row_group_rows(metadata: pq.FileMetaData) -> tuple[int, ...]:
    return tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))


class ParquetFormat:
    """`InputFormat` for Parquet: one chunk per row group."""

    name = "parquet"
    label = "Parquet"
    suffixes = (".parquet",)

    def describe(self, fs: pafs.FileSystem, path: str, size: int) -> FileLayout:
        if size == 0:
            raise JobInputError(f"input file {path} is empty (0 bytes), expected a Parquet file")
        try:
            with fs.open_input_file(path) as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                row_group_rows = _row_group_rows(parquet.metadata)
                num_rows = parquet.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise JobInputError(f"input file {path} is not a readable Parquet file "
                                f"(corrupt, truncated or another format): {exc}") from None
        if sum(row_group_rows) != num_rows:
            raise JobInputError(f"input file {path}: row groups hold {sum(row_group_rows)} rows but "
                                f"the footer says {num_rows}; the file is corrupt")
        return FileLayout(num_rows, row_group_rows, schema)

    def read_chunks(self, fs: pafs.FileSystem, path: str, chunk_rows: tuple[int, ...],
                    chunks: list[int], read_ahead: int) -> tuple[pa.Table, list[int]]:
        """Row groups `chunks`, and the following ones while their `total_byte_size` fits in
        `read_ahead` (the file is opened once for all)."""
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.metadata
            found = _row_group_rows(metadata)
            if found != chunk_rows:
                raise JobInputError(f"the file changed since the job was planned (row groups "
                                    f"{list(chunk_rows)} expected, {list(found)} found)")
            groups = list(chunks)
            budget = read_ahead
            while budget > 0 and groups[-1] + 1 < metadata.num_row_groups:
                budget -= metadata.row_group(groups[-1] + 1).total_byte_size
                if budget >= 0:
                    groups.append(groups[-1] + 1)
            return parquet.read_row_groups(groups), groups
