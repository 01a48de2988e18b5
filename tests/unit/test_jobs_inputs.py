"""Job inputs: resolving files, directories and globs, and refusing malformed Parquet before any
compute with messages that name the file and column."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.jobs import JobInputError, JobSpec, open_inputs
from ternpool.engine.requests import SamplingParams, SamplingValueError
from ternpool.jobs.output import OUTPUT_COLUMNS
from ternpool.jobs.spec import derive_seed

pytestmark = pytest.mark.unit

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(path, columns: dict, schema: pa.Schema | None = None, row_group_size=None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def prompts(n: int, start: int = 0) -> dict:
    return {"id": [f"r{i}" for i in range(start, start + n)],
            "prompt": [f"prompt {i}" for i in range(start, start + n)]}


def error_of(uri) -> str:
    with pytest.raises(JobInputError) as info:
        open_inputs(str(uri))
    return str(info.value)


# -- resolution and metadata -----------------------------------------------------------------


def test_single_file_metadata(tmp_path):
    path = write(tmp_path / "a.parquet", {**prompts(10), "temperature": [0.5] * 10,
                                          "extra": list(range(10))}, row_group_size=4)
    inputs = open_inputs(path)
    assert inputs.num_rows == 10
    assert len(inputs.files) == 1
    f = inputs.files[0]
    assert f.path == path and f.num_rows == 10 and f.chunk_rows == (4, 4, 2)
    assert f.size == os.path.getsize(path) and f.mtime is not None
    assert inputs.text_column == "prompt"
    assert inputs.sampling_columns == ("temperature",)
    assert inputs.passthrough == ("id", "extra")
    assert inputs.fingerprint() == [{"path": path, "size": f.size, "mtime": f.mtime}]
    assert inputs.filesystem().get_file_info(path).size == f.size


def test_relative_path_made_absolute(tmp_path, monkeypatch):
    write(tmp_path / "a.parquet", prompts(3))
    monkeypatch.chdir(tmp_path)
    inputs = open_inputs("a.parquet")
    assert os.path.isabs(inputs.uri) and inputs.files[0].path == str(tmp_path / "a.parquet")


def test_directory_is_recursive_sorted_and_skips_hidden(tmp_path):
    write(tmp_path / "d" / "b.parquet", prompts(2))
    write(tmp_path / "d" / "a.parquet", prompts(3))
    write(tmp_path / "d" / "sub" / "c.parquet", prompts(1))
    write(tmp_path / "d" / "_tmp.parquet", prompts(5))
    write(tmp_path / "d" / ".hidden.parquet", prompts(5))
    write(tmp_path / "d" / "_temporary" / "x.parquet", prompts(5))
    (tmp_path / "d" / "notes.txt").write_text("not an input")
    inputs = open_inputs(str(tmp_path / "d"))
    names = [os.path.relpath(f.path, tmp_path / "d") for f in inputs.files]
    assert names == ["a.parquet", "b.parquet", os.path.join("sub", "c.parquet")]
    assert inputs.num_rows == 6


def test_local_glob(tmp_path):
    for name in ("p2.parquet", "p1.parquet", "q1.parquet"):
        write(tmp_path / name, prompts(2))
    inputs = open_inputs(str(tmp_path / "p*.parquet"))
    assert [os.path.basename(f.path) for f in inputs.files] == ["p1.parquet", "p2.parquet"]
    inputs = open_inputs(str(tmp_path / "[pq]1.parquet"))
    assert [os.path.basename(f.path) for f in inputs.files] == ["p1.parquet", "q1.parquet"]


def test_uri_and_uri_glob(tmp_path):
    for name in ("b.parquet", "a.parquet", "c.txt"):
        if name.endswith(".parquet"):
            write(tmp_path / "d" / name, prompts(2))
    write(tmp_path / "d" / "sub" / "z.parquet", prompts(2))
    uri = (tmp_path / "d").as_uri()
    assert [os.path.basename(f.path) for f in open_inputs(uri).files] == \
        ["a.parquet", "b.parquet", "z.parquet"]
    globbed = open_inputs(uri + "/*.parquet")
    assert [os.path.basename(f.path) for f in globbed.files] == ["a.parquet", "b.parquet"]
    assert globbed.filesystem().get_file_info(globbed.files[0].path).size == globbed.files[0].size
    nested = open_inputs(uri + "/*/z.parq*")
    assert [os.path.basename(f.path) for f in nested.files] == ["z.parquet"]


def test_no_files_matched_names_the_uri(tmp_path):
    message = error_of(tmp_path / "nothing-*.parquet")
    assert "no Parquet, OpenAI Batch or JSON Lines files" in message and "nothing-*.parquet" in message
    (tmp_path / "empty-dir").mkdir()
    assert str(tmp_path / "empty-dir") in error_of(tmp_path / "empty-dir")
    message = error_of(tmp_path / "missing.parquet")
    assert "missing.parquet" in message and "does not exist" in message


def test_input_set_pickles_small(tmp_path):
    import pickle

    inputs = open_inputs(write(tmp_path / "a.parquet", prompts(3)))
    assert pickle.loads(pickle.dumps(inputs)) == inputs


def test_messages_column(tmp_path):
    messages = [[{"role": "user", "content": "hi"}]] * 2
    path = write(tmp_path / "m.parquet", {"messages": messages, "meta": [1, 2]},
                 schema=pa.schema([("messages", MESSAGES_TYPE), ("meta", pa.int64())]))
    inputs = open_inputs(path)
    assert inputs.text_column == "messages" and inputs.passthrough == ("meta",)
    large = pa.large_list(pa.struct([("role", pa.large_string()), ("content", pa.string()),
                                     ("name", pa.string())]))
    path = write(tmp_path / "l.parquet", {"messages": [[{"role": "user", "content": "x",
                                                          "name": None}]]},
                 schema=pa.schema([("messages", large)]))
    assert open_inputs(path).text_column == "messages"


def test_sampling_columns_accepted_types(tmp_path):
    schema = pa.schema([("prompt", pa.large_string()), ("max_tokens", pa.uint16()),
                        ("temperature", pa.int32()), ("top_p", pa.float32()),
                        ("top_k", pa.int8()), ("seed", pa.int64()),
                        ("stop", pa.list_(pa.string()))])
    path = write(tmp_path / "s.parquet", {"prompt": ["x"], "max_tokens": [3], "temperature": [1],
                                          "top_p": [0.5], "top_k": [2], "seed": [7],
                                          "stop": [["a"]]}, schema=schema)
    inputs = open_inputs(path)
    assert inputs.sampling_columns == ("max_tokens", "temperature", "top_p", "top_k", "seed",
                                       "stop")
    assert inputs.passthrough == ()
    path = write(tmp_path / "t.parquet", {"prompt": ["x"], "stop": ["\n"], "seed": [None]},
                 schema=pa.schema([("prompt", pa.string()), ("stop", pa.string()),
                                   ("seed", pa.null())]))
    assert open_inputs(path).sampling_columns == ("seed", "stop")


# -- malformed inputs ------------------------------------------------------------------------


def test_missing_text_column(tmp_path):
    path = write(tmp_path / "a.parquet", {"text": ["hello"]})
    message = error_of(path)
    assert path in message and "'prompt'" in message and "'messages'" in message
    assert "neither" in message and "text" in message


def test_both_text_columns(tmp_path):
    path = write(tmp_path / "a.parquet", {"prompt": ["x"], "messages": [[{"role": "user",
                                                                          "content": "x"}]]})
    message = error_of(path)
    assert path in message and "both" in message and "'prompt'" in message


def test_prompt_not_string(tmp_path):
    path = write(tmp_path / "a.parquet", {"prompt": [1, 2]})
    message = error_of(path)
    assert path in message and "'prompt'" in message and "int64" in message
    assert "expected string" in message


@pytest.mark.parametrize("messages_type, problem", [
    (pa.string(), "not a list"),
    (pa.list_(pa.string()), "not structs"),
    (pa.list_(pa.struct([("role", pa.string())])), "'content'"),
    (pa.list_(pa.struct([("role", pa.int32()), ("content", pa.string())])),
     "'role' field is int32"),
])
def test_messages_wrong_structure(tmp_path, messages_type, problem):
    values = {pa.string(): ["x"], pa.list_(pa.string()): [["x"]]}.get(messages_type)
    if values is None:
        item = messages_type.value_type
        fields = [item.field(i) for i in range(item.num_fields)]
        values = [[{f.name: (1 if pa.types.is_integer(f.type) else "x") for f in fields}]]
    path = write(tmp_path / "m.parquet", {"messages": values},
                 schema=pa.schema([("messages", messages_type)]))
    message = error_of(path)
    assert path in message and "'messages'" in message and problem in message
    assert "list<struct<role: string, content: string>>" in message


@pytest.mark.parametrize("column, arrow_type, value, expected", [
    ("max_tokens", pa.string(), "5", "integer"),
    ("temperature", pa.string(), "hot", "floating point or integer"),
    ("top_p", pa.bool_(), True, "floating point or integer"),
    ("top_k", pa.bool_(), True, "integer"),
    ("seed", pa.string(), "7", "integer"),
    ("stop", pa.int64(), 3, "string or list<string>"),
    ("stop", pa.list_(pa.int64()), [3], "string or list<string>"),
    ("logprobs_mode", pa.int64(), 1, "expected string"),
])
def test_sampling_column_wrong_type(tmp_path, column, arrow_type, value, expected):
    path = write(tmp_path / "a.parquet", {"prompt": ["x"], column: [value]},
                 schema=pa.schema([("prompt", pa.string()), (column, arrow_type)]))
    message = error_of(path)
    assert path in message and repr(column) in message
    found = str(arrow_type).replace("item", "element")  # Parquet names list items "element"
    assert f"type {found}" in message and expected in message


@pytest.mark.parametrize("column", [c for c in OUTPUT_COLUMNS])
def test_output_column_collision(tmp_path, column):
    path = write(tmp_path / "a.parquet", {"prompt": ["x"], column: ["y"]})
    message = error_of(path)
    assert path in message and repr(column) in message and "output column" in message


def test_zero_byte_file(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_bytes(b"")
    message = error_of(path)
    assert str(path) in message and "empty" in message


def test_corrupt_and_truncated_files(tmp_path):
    good = write(tmp_path / "good.parquet", prompts(20))
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2] + data[-8:])
    assert str(truncated) in error_of(truncated)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1" + bytes(range(256)) * 3 + b"PAR1")
    assert str(garbage) in error_of(garbage)


def test_non_parquet_file(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_text("id,prompt\n1,hello\n")
    message = error_of(path)
    assert str(path) in message and "Parquet" in message
    # in a directory with good files, the bad one is named
    write(tmp_path / "d" / "a.parquet", prompts(2))
    (tmp_path / "d" / "b.parquet").write_text("not parquet")
    assert str(tmp_path / "d" / "b.parquet") in error_of(tmp_path / "d")


def test_zero_rows(tmp_path):
    path = write(tmp_path / "a.parquet", {"prompt": pa.array([], pa.string())})
    message = error_of(path)
    assert "no rows" in message and path in message


def test_one_empty_file_among_others_is_fine(tmp_path):
    write(tmp_path / "a.parquet", {"id": pa.array([], pa.string()),
                                   "prompt": pa.array([], pa.string())})
    write(tmp_path / "b.parquet", prompts(3))
    inputs = open_inputs(str(tmp_path))
    assert [f.num_rows for f in inputs.files] == [0, 3] and inputs.num_rows == 3


def test_schema_mismatch_between_files(tmp_path):
    a = write(tmp_path / "a.parquet", prompts(2))
    b = write(tmp_path / "b.parquet", {"id": [1, 2], "prompt": ["x", "y"]})
    message = error_of(tmp_path)
    assert a in message and b in message and "'id'" in message
    assert "string" in message and "int64" in message


def test_schema_mismatch_extra_column(tmp_path):
    a = write(tmp_path / "a.parquet", prompts(2))
    b = write(tmp_path / "b.parquet", {**prompts(2), "extra": [1, 2]})
    message = error_of(tmp_path)
    assert a in message and b in message and "'extra'" in message


def test_same_columns_in_another_order_are_one_job(tmp_path):
    write(tmp_path / "a.parquet", {**prompts(2), "meta": [1, 2]})
    write(tmp_path / "b.parquet", {"meta": [3], "prompt": ["x"], "id": ["y"]})
    inputs = open_inputs(str(tmp_path))
    assert inputs.num_rows == 3 and inputs.passthrough == ("id", "meta")
    assert inputs.schema.names == ["id", "prompt", "meta"]  # the first file's order


def test_float_integer_sampling_columns_are_accepted(tmp_path):
    # pandas writes an integer column with nulls as float64
    path = write(tmp_path / "a.parquet", {"prompt": ["x", "y"], "max_tokens": [4.0, None],
                                          "top_k": pa.array([2.0, None], pa.float32()),
                                          "seed": [7.0, None]})
    assert open_inputs(path).sampling_columns == ("max_tokens", "top_k", "seed")


def test_file_whose_name_contains_glob_characters(tmp_path):
    path = write(tmp_path / "weird[1].parquet", prompts(2))
    assert open_inputs(path).files[0].path == path


# -- spec ------------------------------------------------------------------------------------


def test_jobspec_validation():
    spec = JobSpec("in", "out", "m", sampling=SamplingParams(stop=["\n"], temperature=0.5))
    assert spec.sampling.stop == ("\n",)
    assert spec.sampling_defaults() == {"max_tokens": 128, "temperature": 0.5, "top_p": 1.0,
                                        "top_k": 0, "seed": 0, "stop": ["\n"]}
    for kwargs, word in [({"shard_rows": 0}, "shard_rows"), ({"max_retries": -1}, "max_retries"),
                         ({"truncate": "right"}, "truncate")]:
        with pytest.raises(ValueError, match=word):
            JobSpec("in", "out", "m", **kwargs)
    for kwargs, word in [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                         ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"),
                         ({"stop": ("",)}, "stop")]:
        with pytest.raises(SamplingValueError, match=word) as info:
            JobSpec("in", "out", "m", sampling=SamplingParams(**kwargs))
        assert info.value.field == word
    with pytest.raises(ValueError, match="JobSpec.sampling must be a SamplingParams"):
        JobSpec("in", "out", "m", sampling={"temperature": 0.5})
    assert JobSpec("in", "out", "m", sampling=SamplingParams(seed=None)).sampling.seed == 0  # the job seed


def test_derive_seed_is_stable_across_processes():
    seeds = [derive_seed(7, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2 ** 63 for s in seeds)
    assert derive_seed(8, 0) != derive_seed(7, 0)
    code = "from ternpool.jobs.spec import derive_seed; print(derive_seed(7, 123))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "99"})
    assert int(other.stdout) == derive_seed(7, 123)
    with pytest.raises(ValueError, match="row_index"):
        derive_seed(0, -1)


def test_import_does_not_load_ray():
    code = "import sys, ternpool.jobs; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
