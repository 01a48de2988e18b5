"""The input-format seam: a format is one class and one registration. A CSV format defined and
registered only in this file goes through listing, schema checks, planning, reading, the chunk
cache and the coordinator, with Parquet's reading code made to fail if anything calls it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ternpool.jobs import JobInputError, JobSpec, Manifest, formats, open_inputs, plan_shards, \
    read_output, read_shard, to_requests
from ternpool.jobs.formats import FileLayout
from ternpool.jobs.formats.parquet import ParquetFormat
from ternpool.jobs.rows import ChunkCache

pytestmark = pytest.mark.unit


class CsvFormat:
    """Comma-separated prompts with a header line; a chunk is every `chunk` rows. Describing a file
    parses all of it (fine for a test; a real text format would index line offsets)."""

    name = "csv"
    label = "CSV"
    suffixes = (".csv",)

    def __init__(self, chunk: int = 4):
        self.chunk = chunk
        self.reads: list[tuple[str, list[int]]] = []  # (file name, chunks) of every read_chunks call

    def _parse(self, fs, path: str) -> pa.Table:
        with fs.open_input_stream(path) as stream:
            return pacsv.read_csv(stream)

    def _chunk_rows(self, num_rows: int) -> tuple[int, ...]:
        full, rest = divmod(num_rows, self.chunk)
        return (self.chunk,) * full + ((rest,) if rest else ())

    def describe(self, fs, path: str, size: int) -> FileLayout:
        try:
            table = self._parse(fs, path)
        except (pa.ArrowException, OSError) as exc:
            raise JobInputError(f"input file {path} is not a readable CSV file: {exc}") from None
        return FileLayout(table.num_rows, self._chunk_rows(table.num_rows), table.schema)

    def read_chunks(self, fs, path, chunk_rows, chunks, read_ahead):
        self.reads.append((path.rsplit("/", 1)[-1], list(chunks)))
        table = self._parse(fs, path)
        if self._chunk_rows(table.num_rows) != chunk_rows:
            raise JobInputError(f"the file changed since the job was planned ({sum(chunk_rows)} rows "
                                f"expected, {table.num_rows} found)")
        start = sum(chunk_rows[:chunks[0]])
        return table.slice(start, sum(chunk_rows[c] for c in chunks)), list(chunks)


def _write_csv(path, ids) -> str:
    lines = ["id,prompt", *(f"{i},prompt {i}" for i in ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def csv_format(monkeypatch) -> CsvFormat:
    """The CSV format, registered for this test only."""
    csv = CsvFormat()
    monkeypatch.setitem(formats.FORMATS, csv.name, csv)
    return csv


@pytest.fixture
def no_parquet_reading(monkeypatch):
    """Parquet's input code raises if anything calls it."""
    def called(*args, **kwargs):
        raise AssertionError("Parquet input code ran for a job without Parquet inputs")

    for name in ("describe", "read_chunks"):
        monkeypatch.setattr(ParquetFormat, name, called)
    monkeypatch.setattr(pq, "ParquetFile", called)


def test_a_format_registered_in_a_test_is_listed_planned_and_read(tmp_path, csv_format, no_parquet_reading):
    _write_csv(tmp_path / "d" / "b.csv", range(10, 17))
    _write_csv(tmp_path / "d" / "a.csv", range(10))
    (tmp_path / "d" / "notes.txt").write_text("not an input")
    inputs = open_inputs(str(tmp_path / "d"))
    assert [f.path.rsplit("/", 1)[-1] for f in inputs.files] == ["a.csv", "b.csv"]
    assert [(f.format, f.num_rows, f.chunk_rows) for f in inputs.files] == \
        [("csv", 10, (4, 4, 2)), ("csv", 7, (4, 3))]
    assert inputs.text_column == "prompt" and inputs.passthrough == ("id",)

    shards = plan_shards(inputs, 5)  # chunks of 4 rows: one shard each, never across files
    assert [(s.file_index, s.row_start, s.row_stop, s.first_row_index) for s in shards] == \
        [(0, 0, 4, 0), (0, 4, 8, 4), (0, 8, 10, 8), (1, 0, 4, 10), (1, 4, 7, 14)]
    cache = ChunkCache()
    seen = []
    for shard in shards:
        table = read_shard(inputs, shard)
        assert table.column_names == ["row_index", "id", "prompt"]
        assert read_shard(inputs, shard, cache).equals(table)
        seen.extend(zip(table["row_index"].to_pylist(), table["id"].to_pylist()))
        requests = to_requests(table, JobSpec("in", "out", "m"), inputs.text_column)
        assert [r.request.prompt for r in requests] == [f"prompt {i}" for i in table["id"].to_pylist()]
    assert seen == [(i, i) for i in range(17)]  # files in path order, every row once

    split = plan_shards(inputs, 3)  # a chunk larger than a shard is cut: its shards read it once
    assert [(s.row_start, s.row_stop) for s in split[:4]] == [(0, 3), (3, 4), (4, 7), (7, 8)]
    csv_format.reads.clear()
    cache = ChunkCache()
    for shard in split[:4]:
        read_shard(inputs, shard, cache)
    assert csv_format.reads == [("a.csv", [0]), ("a.csv", [1])]


def test_errors_of_a_new_format_name_the_file_column_and_shard(tmp_path, csv_format, no_parquet_reading):
    message = str(pytest.raises(JobInputError, open_inputs, str(tmp_path / "none-*.csv")).value)
    assert "no Parquet, OpenAI Batch, JSON Lines or CSV files found" in message and "none-*.csv" in message

    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,hello\n")
    message = str(pytest.raises(JobInputError, open_inputs, str(bad)).value)
    assert str(bad) in message and "'prompt'" in message and "neither" in message

    path = _write_csv(tmp_path / "a.csv", range(6))
    inputs = open_inputs(path)
    shards = plan_shards(inputs, 4)
    _write_csv(tmp_path / "a.csv", range(9))
    message = str(pytest.raises(JobInputError, read_shard, inputs, shards[1]).value)
    assert message.startswith(f"input file {path}, shard 1 (rows 4..5 of the file): the file changed")

    (tmp_path / "a.csv").write_text("id,prompt\n1,x,y,z\n")  # a row with too many fields
    message = str(pytest.raises(JobInputError, read_shard, inputs, shards[0]).value)
    assert message.startswith(f"input file {path}, shard 0 (rows 0..3 of the file): cannot read: ")


def test_one_job_may_mix_formats(tmp_path, csv_format):
    pq.write_table(pa.table({"id": list(range(3)), "prompt": [f"prompt {i}" for i in range(3)]}),
                   tmp_path / "a.parquet", row_group_size=2)
    _write_csv(tmp_path / "b.csv", range(3, 8))
    inputs = open_inputs(str(tmp_path))
    assert [(f.format, f.chunk_rows) for f in inputs.files] == [("parquet", (2, 1)), ("csv", (4, 1))]
    rows = [read_shard(inputs, shard) for shard in plan_shards(inputs, 4)]
    assert pa.concat_tables(rows)["id"].to_pylist() == list(range(8))


def test_the_coordinator_runs_a_job_of_a_new_format(tmp_path, csv_format, no_parquet_reading):
    from ternpool.cluster.coordinator import DONE, Coordinator
    from ternpool.engine.requests import Result

    _write_csv(tmp_path / "in" / "a.csv", range(9))
    spec = JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), "model", shard_rows=4)
    inputs = open_inputs(spec.inputs)
    plan = plan_shards(inputs, spec.shard_rows)
    coordinator = Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, {"m": 1}), 2)
    while (lease := coordinator.lease("w")) != DONE:
        key, table = lease
        results = [Result(i, f"text {i}", (1,), 2, 1, "length") for i in table["row_index"].to_pylist()]
        assert coordinator.complete("w", key, results)
    out = read_output(spec.output)
    assert out["row_index"].to_pylist() == list(range(9)) and out["id"].to_pylist() == list(range(9))
    assert out["generated_text"].to_pylist() == [f"text {i}" for i in range(9)]
