"""Rows to requests (per-row overrides, defaults, seeds, bad rows) and results to output parts
(ordering, passthrough, atomic writes, reading back in input order)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.engine.requests import Result, SamplingParams
from ternpool.jobs import JobInputError, JobSpec, Manifest, open_inputs, plan_shards, \
    read_output, read_shard, result_table, to_requests, write_part
from ternpool.jobs.output import OUTPUT_SCHEMA_FIELDS, error_results, part_name
from ternpool.jobs.spec import derive_seed

pytestmark = pytest.mark.unit

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def spec(tmp_path, **kwargs) -> JobSpec:
    return JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), "model", **kwargs)


def with_row_index(columns: dict, schema=None, start=0) -> pa.Table:
    table = pa.table(columns, schema=schema)
    return table.add_column(0, "row_index", pa.array(range(start, start + table.num_rows),
                                                     pa.int64()))


def ok(text="out", prompt_tokens=3, completion_tokens=2, reason="stop", key=0) -> Result:
    return Result(key, text, (1, 2), prompt_tokens, completion_tokens, reason)


# -- to_requests -----------------------------------------------------------------------------


def test_prompt_rows_with_overrides_and_defaults(tmp_path):
    job = spec(tmp_path, sampling=SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, top_k=5, seed=11,
                                                 stop=("END",)))
    table = with_row_index({
        "prompt": ["a", "b", "c"],
        "max_tokens": pa.array([4, None, None], pa.int32()),
        "temperature": pa.array([None, 0.0, None], pa.float64()),
        "top_p": pa.array([None, None, 0.5], pa.float32()),
        "top_k": pa.array([None, 1, None], pa.int64()),
        "seed": pa.array([None, 99, None], pa.int64()),
        "stop": pa.array([None, "\n", None], pa.string()),
    }, start=40)
    rows = to_requests(table, job, "prompt")
    assert [r.row_index for r in rows] == [40, 41, 42] and all(r.error is None for r in rows)
    assert [r.request.key for r in rows] == [40, 41, 42]
    assert [r.request.prompt for r in rows] == ["a", "b", "c"]
    assert all(r.request.messages is None for r in rows)
    p0, p1, p2 = (r.request.params for r in rows)
    assert p0 == SamplingParams(4, 0.7, 0.9, 5, derive_seed(11, 40), ("END",))
    assert p1 == SamplingParams(16, 0.0, 0.9, 1, 99, ("\n",))
    assert p2 == SamplingParams(16, 0.7, 0.5, 5, derive_seed(11, 42), ("END",))


def test_float_integer_columns_integral_values_nulls_and_bad_values(tmp_path):
    job = spec(tmp_path, sampling=SamplingParams(max_tokens=16, top_k=5, seed=11))
    nan, inf = float("nan"), float("inf")
    table = with_row_index({
        "prompt": ["a", "b", "c", "d", "e", "f"],
        "max_tokens": pa.array([4.0, None, 2.5, nan, 8.0, 8.0], pa.float64()),
        "top_k": pa.array([3.0, None, None, None, inf, None], pa.float32()),
        "seed": pa.array([9.0, None, None, None, None, -1.5], pa.float64()),
    }, start=10)
    rows = to_requests(table, job, "prompt")
    assert rows[0].error is None and rows[0].request.params == SamplingParams(4, 0.0, 1.0, 3, 9)
    assert type(rows[0].request.params.max_tokens) is int
    # nulls mean the job defaults
    assert rows[1].request.params == SamplingParams(16, 0.0, 1.0, 5, derive_seed(11, 11))
    assert rows[2].request is None and rows[2].error == "row 12: column 'max_tokens' is 2.5, expected an integer"
    assert rows[3].request is None and rows[3].error == "row 13: column 'max_tokens' is nan, expected an integer"
    assert rows[4].request is None and rows[4].error == "row 14: column 'top_k' is inf, expected an integer"
    assert rows[5].request is None and rows[5].error == "row 15: column 'seed' is -1.5, expected an integer"


def test_stop_list_column_and_empty_list(tmp_path):
    table = with_row_index({"prompt": ["a", "b", "c"],
                            "stop": pa.array([["x", "y"], [], None], pa.list_(pa.string()))})
    rows = to_requests(table, spec(tmp_path, sampling=SamplingParams(stop=("D",))), "prompt")
    assert [r.request.params.stop for r in rows] == [("x", "y"), (), ("D",)]


def test_derived_seeds_are_stable_and_distinct(tmp_path):
    table = with_row_index({"prompt": [f"p{i}" for i in range(50)]})

    def job(seed: int) -> JobSpec:
        return spec(tmp_path, sampling=SamplingParams(seed=seed))

    first = [r.request.params.seed for r in to_requests(table, job(3), "prompt")]
    again = [r.request.params.seed for r in to_requests(table, job(3), "prompt")]
    other = [r.request.params.seed for r in to_requests(table, job(4), "prompt")]
    assert first == again and len(set(first)) == 50
    assert first != other
    # the same row read in a different shard (e.g. after a split) keeps its seed
    tail = to_requests(table.slice(30), job(3), "prompt")
    assert [r.request.params.seed for r in tail] == first[30:]


def test_messages_rows(tmp_path):
    messages = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                [], None, [{"role": "user", "content": None}], [{"role": None, "content": "x"}]]
    table = with_row_index({"messages": pa.array(messages, MESSAGES_TYPE)})
    rows = to_requests(table, spec(tmp_path), "messages")
    assert rows[0].error is None and rows[0].request.prompt is None
    assert list(rows[0].request.messages) == messages[0]
    assert rows[1].request is None and rows[1].error == \
        "row 1: column 'messages' is an empty list of messages"
    assert rows[2].error == "row 2: column 'messages' is null"
    assert rows[3].error == "row 3: column 'messages': message 0 has a null 'content'"
    assert rows[4].error == "row 4: column 'messages': message 0 has a null 'role'"


def test_bad_rows_get_errors_not_exceptions(tmp_path):
    table = with_row_index({
        "id": ["a", "b", "c", "d", "e", "f", "g", "h"],
        "prompt": ["ok", None, "", "x", "x", "x", "x", "x"],
        "temperature": pa.array([None, None, None, -1.0, float("nan"), None, None, None]),
        "top_p": pa.array([None, None, None, None, None, 1.5, None, None]),
        "max_tokens": pa.array([None, None, None, None, None, None, 0, None], pa.int64()),
        "stop": pa.array([None] * 7 + [[None]], pa.list_(pa.string())),
    }, start=10)
    rows = to_requests(table, spec(tmp_path), "prompt")
    assert rows[0].error is None and rows[0].request is not None
    errors = [r.error for r in rows[1:]]
    assert all(r.request is None for r in rows[1:])
    assert errors[0] == "row 11: column 'prompt' is null"
    assert errors[1] == "row 12: column 'prompt' is an empty string"
    assert errors[2].startswith("row 13: column 'temperature': temperature must be")
    assert errors[3].startswith("row 14: column 'temperature': temperature must be")
    assert errors[4].startswith("row 15: column 'top_p': top_p must be in (0, 1]")
    assert errors[5].startswith("row 16: column 'max_tokens': max_tokens must be")
    assert errors[6].startswith("row 17: column 'stop': stop strings must be")


def test_read_shard_of_corrupt_data_names_file_and_shard(tmp_path):
    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" * 20 for i in range(200)]}), path,
                   row_group_size=100, compression="none")
    inputs = open_inputs(str(path))
    shards = plan_shards(inputs, 100)
    data = bytearray(path.read_bytes())
    for i in range(200, 2000):  # scribble over data pages, keep the footer intact
        data[i] = 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(JobInputError) as info:
        read_shard(inputs, shards[0])
    assert str(path) in str(info.value) and "shard 0" in str(info.value)


def test_read_shard_notices_changed_file(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x"] * 10}), path, row_group_size=5)
    inputs = open_inputs(str(path))
    shards = plan_shards(inputs, 5)
    pq.write_table(pa.table({"prompt": ["x"] * 10}), path, row_group_size=3)
    with pytest.raises(JobInputError, match="changed since the job was planned"):
        read_shard(inputs, shards[1])


@pytest.mark.parametrize("row_groups,shard_rows,max_bytes,read_ahead", [  # Parquet row groups: the chunks
    ([1000], 64, 256 << 20, 8 << 20),  # one big row group (pyarrow's default for small files)
    ([7] * 40 + [300, 5], 16, 256 << 20, 8 << 20),  # small groups merged into shards, read ahead
    ([7] * 40 + [300, 5], 16, 2000, 1500),  # eviction on every read, a little read-ahead
    ([50, 30, 90, 10, 200], 64, 256 << 20, 0),  # shards spanning groups, no read-ahead
])
def test_cached_read_shard_equals_the_plain_read(tmp_path, row_groups, shard_rows, max_bytes, read_ahead):
    from ternpool.jobs.rows import ChunkCache

    path = tmp_path / "a.parquet"
    n = sum(row_groups)
    table = pa.table({"prompt": [f"prompt {i}" for i in range(n)], "n": list(range(n))})
    with pq.ParquetWriter(path, table.schema) as w:
        start = 0
        for rows in row_groups:
            w.write_table(table.slice(start, rows), row_group_size=rows)
            start += rows
    inputs = open_inputs(str(path))
    assert inputs.files[0].chunk_rows == tuple(row_groups)
    shards = plan_shards(inputs, shard_rows)
    cache = ChunkCache(max_bytes=max_bytes, read_ahead=read_ahead)
    order = shards + shards[::-1] + shards[::3]  # in order (as leased), then out of order (requeued pieces)
    for shard in order:
        got = read_shard(inputs, shard, cache)
        assert got.equals(read_shard(inputs, shard)), shard
        assert got.column("n").to_pylist() == list(range(shard.first_row_index, shard.first_row_index + shard.num_rows))
    assert cache._bytes <= max(max_bytes, table.nbytes)


def test_cache_reads_a_big_chunk_once_and_still_notices_a_changed_file(tmp_path, monkeypatch):
    from ternpool.jobs import rows
    from ternpool.jobs.rows import ChunkCache

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x"] * 1000}), path)  # one row group
    inputs = open_inputs(str(path))
    shards = plan_shards(inputs, 10)
    reads = []
    real = rows._read_chunks
    monkeypatch.setattr(rows, "_read_chunks", lambda *a, **k: reads.append(a[2]) or real(*a, **k))
    cache = ChunkCache()
    for shard in shards:
        read_shard(inputs, shard, cache)
    assert reads == [[0]]
    pq.write_table(pa.table({"prompt": ["x"] * 1000}), path, row_group_size=300)
    with pytest.raises(JobInputError, match="changed since the job was planned"):
        read_shard(inputs, shards[0], ChunkCache())


# -- result_table ----------------------------------------------------------------------------


def test_result_table_order_and_passthrough():
    nested_type = pa.struct([("tags", pa.list_(pa.string())), ("score", pa.float64())])
    shard = with_row_index({
        "id": pa.array([7, 3, 5], pa.int32()),
        "prompt": ["a", "b", "c"],
        "meta": pa.array([{"tags": ["x"], "score": 1.0}, None,
                          {"tags": [], "score": 2.5}], nested_type),
    }, start=20)
    results = {22: ok("third", 4, 1, "length"), 20: ok("first"),
               21: Result.failed(21, "prompt longer than the context (900 > 512 tokens)", 900),
               99: ok("not in this shard")}
    out = result_table(shard, results, ("id", "meta"))
    assert out.column_names == ["row_index", "id", "meta", "generated_text", "finish_reason",
                                "prompt_tokens", "completion_tokens", "error", "generated_logprobs",
                                "prompt_token_logprobs"]
    assert out.schema.field("id").type == pa.int32()
    assert out.schema.field("meta").type == nested_type
    for name, arrow_type in OUTPUT_SCHEMA_FIELDS:
        assert out.schema.field(name).type == arrow_type
    assert out["row_index"].to_pylist() == [20, 21, 22]
    assert out["id"].to_pylist() == [7, 3, 5]
    assert out["meta"].to_pylist() == shard["meta"].to_pylist()
    assert out["generated_text"].to_pylist() == ["first", "", "third"]
    assert out["finish_reason"].to_pylist() == ["stop", "error", "length"]
    assert out["prompt_tokens"].to_pylist() == [3, 900, 4]
    assert out["completion_tokens"].to_pylist() == [2, 0, 1]
    assert out["error"].to_pylist() == [None, "prompt longer than the context (900 > 512 tokens)",
                                        None]


def test_result_table_refuses_missing_results():
    shard = with_row_index({"prompt": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="row_index 1"):
        result_table(shard, {0: ok(), 2: ok()}, ())


def test_error_results():
    results = error_results([4, 5], "worker died 3 times")
    assert set(results) == {4, 5}
    assert all(r.finish_reason == "error" and r.error == "worker died 3 times" and r.text == ""
               for r in results.values())
    out = result_table(with_row_index({"prompt": ["a", "b"]}, start=4), results, ())
    assert out["error"].to_pylist() == ["worker died 3 times"] * 2


# -- part files and read_output --------------------------------------------------------------


def test_part_name():
    assert part_name(42) == "part-00042.parquet"
    assert part_name(123456) == "part-123456.parquet"


def test_write_part_is_atomic(tmp_path, monkeypatch):
    import ternpool.jobs.output as output_module

    out = tmp_path / "out"
    table = result_table(with_row_index({"prompt": ["a"]}), {0: ok()}, ())
    seen_while_writing = []
    real_write_table = output_module.pq.write_table

    def spying_write_table(t, sink, **kwargs):
        seen_while_writing.extend(sorted(os.listdir(out)))
        return real_write_table(t, sink, **kwargs)

    monkeypatch.setattr(output_module.pq, "write_table", spying_write_table)
    path = write_part(str(out), 42, table)
    assert path == str(out / "part-00042.parquet")
    assert len(seen_while_writing) == 1
    assert seen_while_writing[0].startswith(".part-00042.parquet.tmp-")
    assert os.listdir(out) == ["part-00042.parquet"]
    assert pq.read_table(path).equals(table)
    # rewriting the same shard replaces the file
    write_part(str(out), 42, table)
    assert os.listdir(out) == ["part-00042.parquet"]

    def failing_write_table(t, sink, **kwargs):
        sink.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(output_module.pq, "write_table", failing_write_table)
    with pytest.raises(OSError, match="disk full"):
        write_part(str(out), 7, table)
    assert os.listdir(out) == ["part-00042.parquet"]  # no part-00007, no temporary left


def test_write_part_to_uri(tmp_path):
    table = result_table(with_row_index({"prompt": ["a"]}), {0: ok()}, ())
    path = write_part((tmp_path / "o").as_uri(), 3, table)
    assert path.endswith("/part-00003.parquet")
    assert pq.read_table(tmp_path / "o" / "part-00003.parquet").equals(table)


def run_fake_job(tmp_path, shard_order):
    """Write inputs, plan, and 'generate' shards in the given order; returns (spec, inputs)."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(5)],
                             "prompt": [f"b {i}" for i in range(5)]}), in_dir / "b.parquet")
    pq.write_table(pa.table({"id": [f"a{i}" for i in range(7)],
                             "prompt": [f"a {i}" for i in range(7)]}), in_dir / "a.parquet",
                   row_group_size=3)
    job = spec(tmp_path, shard_rows=3)
    inputs = open_inputs(job.inputs)
    plan = plan_shards(inputs, job.shard_rows)
    manifest = Manifest.open(job.output, job, inputs, plan, {"name": "fake"})
    for shard_id in shard_order(len(plan)):
        shard = plan[shard_id]
        table = read_shard(inputs, shard)
        requests = to_requests(table, job, inputs.text_column)
        results = {r.row_index: ok(r.request.prompt.upper(), key=r.row_index) for r in requests}
        write_part(job.output, shard.shard_id, result_table(table, results, inputs.passthrough))
        manifest.record(shard.shard_id, table.num_rows, 0)
    return job, inputs


def test_read_output_is_ordered_like_input(tmp_path):
    job, inputs = run_fake_job(tmp_path, lambda n: reversed(range(n)))
    out = read_output(job.output)
    assert out.num_rows == 12
    assert out["row_index"].to_pylist() == list(range(12))
    assert out["id"].to_pylist() == [f"a{i}" for i in range(7)] + [f"b{i}" for i in range(5)]
    assert out["generated_text"].to_pylist() == [f"A {i}" for i in range(7)] + \
        [f"B {i}" for i in range(5)]
    assert out.column_names == ["row_index", "id", "generated_text", "finish_reason",
                                "prompt_tokens", "completion_tokens", "error", "generated_logprobs",
                                "prompt_token_logprobs"]


def test_read_output_ignores_stray_parts(tmp_path):
    job, inputs = run_fake_job(tmp_path, lambda n: [0, 1])  # shards 0 and 1 of 5
    stray = pa.table({"row_index": pa.array([100], pa.int64()), "id": ["zzz"]})
    pq.write_table(stray, os.path.join(job.output, "part-00004.parquet"))
    pq.write_table(stray, os.path.join(job.output, "part-99999.parquet"))
    out = read_output(job.output)
    assert out["row_index"].to_pylist() == list(range(6))


def test_read_output_without_manifest(tmp_path):
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"row_index": [0]}), tmp_path / "out" / "part-00000.parquet")
    with pytest.raises(JobInputError, match="_manifest.json"):
        read_output(str(tmp_path / "out"))


def test_read_output_missing_listed_part(tmp_path):
    job, _ = run_fake_job(tmp_path, lambda n: range(n))
    os.remove(os.path.join(job.output, "part-00002.parquet"))
    with pytest.raises(JobInputError, match="part-00002.parquet"):
        read_output(job.output)


def test_files_with_columns_in_another_order_read_and_write_by_name(tmp_path):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    pq.write_table(pa.table({"id": ["a0", "a1"], "prompt": ["a 0", "a 1"], "meta": [1, 2],
                             "max_tokens": [5, 6]}), in_dir / "a.parquet")
    pq.write_table(pa.table({"max_tokens": [7], "meta": [3], "prompt": ["b 0"], "id": ["b0"]}),
                   in_dir / "b.parquet")
    job = spec(tmp_path, shard_rows=2)
    inputs = open_inputs(job.inputs)
    plan = plan_shards(inputs, job.shard_rows)
    manifest = Manifest.open(job.output, job, inputs, plan, {"name": "fake"})
    for shard in plan:
        table = read_shard(inputs, shard)
        assert table.column_names == ["row_index", "id", "prompt", "meta", "max_tokens"]
        requests = to_requests(table, job, inputs.text_column)
        results = {r.row_index: ok(f"{r.request.prompt}/{r.request.params.max_tokens}",
                                   key=r.row_index) for r in requests}
        write_part(job.output, shard.shard_id, result_table(table, results, inputs.passthrough))
        manifest.record(shard.shard_id, table.num_rows, 0)
    out = read_output(job.output)
    assert out.column_names == ["row_index", "id", "meta", "generated_text", "finish_reason",
                                "prompt_tokens", "completion_tokens", "error", "generated_logprobs",
                                "prompt_token_logprobs"]
    assert out["id"].to_pylist() == ["a0", "a1", "b0"]
    assert out["meta"].to_pylist() == [1, 2, 3]
    assert out["generated_text"].to_pylist() == ["a 0/5", "a 1/6", "b 0/7"]
