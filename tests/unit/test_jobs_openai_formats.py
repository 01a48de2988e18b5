"""JSON Lines and OpenAI Batch input files: detection, the mapping of a request's body to the text and
sampling columns, every error with its line number, duplicate custom_ids, hostile files, and shards
that read only their own byte range."""

from __future__ import annotations

import json

import pytest

from ternpool.jobs import JobInputError, JobSpec, formats, open_inputs, plan_shards, read_shard, to_requests
from ternpool.jobs.formats import lines
from ternpool.jobs.formats.openai_batch import LOGPROBS

pytestmark = pytest.mark.unit

SPEC = JobSpec(inputs="in", output="out", model="m")


def chat(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {custom_id}"}], **body}}


def write_lines(path, items) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return str(path)


def requests_of(path: str, **open_kw):
    inputs = open_inputs(path, **open_kw)
    out = []
    for shard in plan_shards(inputs, 64):
        table = read_shard(inputs, shard)
        out += to_requests(table, SPEC, inputs.text_column)
    return inputs, out


def test_openai_file_is_detected_and_body_fields_become_sampling_values(tmp_path):
    path = write_lines(tmp_path / "batch.jsonl", [
        chat("a", max_tokens=7, temperature=0.5, top_p=0.9, seed=11, stop="END", user="u", metadata={"k": "v"},
             store=True),
        chat("b", max_completion_tokens=3, stop=["x", "y"], n=1, presence_penalty=0, logit_bias={},
             response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}),
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                 {"type": "text", "text": "brief"}]},
                               {"role": "user", "content": "Q"}]}},
    ])
    inputs, rows = requests_of(path)
    assert inputs.files[0].format == "openai" and inputs.text_column == "messages"
    assert inputs.passthrough == ("custom_id", "url", "input_line")
    a, b, c = (r.request for r in rows)
    assert (a.params.max_tokens, a.params.temperature, a.params.top_p, a.params.seed, a.params.stop) == \
        (7, 0.5, 0.9, 11, ("END",))
    assert a.messages == [{"role": "user", "content": "hi a"}]
    assert (b.params.max_tokens, b.params.stop, b.params.temperature) == (3, ("x", "y"), SPEC.sampling.temperature)
    assert c.messages == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Q"}]
    assert c.params.max_tokens == SPEC.sampling.max_tokens  # a field left out takes the job's default
    assert b.params.response_format == {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}
    assert a.params.response_format is None and c.params.response_format is None


def test_vllm_guided_choice_and_regex_extras_become_the_rows_constraint(tmp_path):
    path = write_lines(tmp_path / "batch.jsonl", [
        chat("a", guided_choice=["yes", "no"]), chat("b", guided_regex="[0-9]{3}"),
        chat("c", response_format={"type": "text"}, guided_regex="x+"),  # text is no constraint
        chat("d", guided_choice=None, guided_regex=None),
    ])
    _, rows = requests_of(path)
    assert [r.error for r in rows] == [None] * 4
    a, b, c, d = (r.request.params for r in rows)
    assert (a.guided_choice, a.guided_regex, a.response_format) == (("yes", "no"), None, None)
    assert (b.guided_choice, b.guided_regex, b.response_format) == (None, "[0-9]{3}", None)
    assert (c.guided_regex, c.response_format) == ("x+", {"type": "text"})
    assert (d.guided_choice, d.guided_regex, d.response_format) == (None, None, None)


def test_completions_endpoint_reads_prompt(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
        {"custom_id": "p1", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 4}},
        {"custom_id": "p2", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["Twice"]}},
        {"custom_id": "p3", "method": "POST", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
        {"custom_id": "p4", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
    ])
    inputs, rows = requests_of(path)
    assert inputs.text_column == "prompt"
    assert [r.request.prompt for r in rows[:2]] == ["Once", "Twice"]
    assert "line 3" in rows[2].error and "body.prompt" in rows[2].error
    assert "line 4" in rows[3].error and "url" in rows[3].error and "one endpoint" in rows[3].error


@pytest.mark.parametrize("body, field", [
    ({"tools": [{"type": "function"}]}, "body.tools"),
    ({"tool_choice": "auto"}, "body.tool_choice"),
    ({"functions": [{}]}, "body.functions"),
    ({"n": 2}, "body.n"),
    ({"logit_bias": {"50256": -100}}, "body.logit_bias"),
    ({"presence_penalty": 0.5}, "body.presence_penalty"),
    ({"frequency_penalty": -1}, "body.frequency_penalty"),
    ({"response_format": {"type": "xml"}}, "body.response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "body.response_format"),
    ({"response_format": '{"type": "json_object"}'}, "body.response_format: expected an object"),
    ({"guided_choice": "yes"}, "body.guided_choice: expected an array of strings, got a string"),
    ({"guided_choice": {"yes": 1}}, "body.guided_choice: expected an array"),
    ({"guided_choice": []}, "body.guided_choice: guided_choice must be a non-empty list"),
    ({"guided_choice": ["a", 1]}, "body.guided_choice"),
    ({"guided_regex": 5}, "body.guided_regex: expected a string"),
    ({"guided_regex": ""}, "body.guided_regex: guided_regex must be a non-empty string"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "body.guided_regex: give at most one"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "body.guided_choice: give at most one"),
    ({"guided_json": {"type": "object"}}, "body.guided_json: not supported"),
    ({"temperature": "hot"}, "body.temperature"),
    ({"max_tokens": 0}, "body.max_tokens"),
    ({"max_tokens": True}, "body.max_tokens"),
    ({"stop": [1]}, "body.stop"),
    ({"top_logprobs": 30, "logprobs": True}, "body.top_logprobs"),
    ({"top_logprobs": 2}, "body.top_logprobs: needs body.logprobs true"),
    ({"logprobs": True, "logprobs_mode": "raw_logits"}, "body.logprobs_mode: 'raw_logits' is not supported"),
    ({"logprobs_mode": 1}, "body.logprobs_mode: 1 is not supported"),
    ({"stream": True}, "body.stream"),
    ({"some_new_field": 1}, "body.some_new_field"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "body.messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "body.messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, "body.messages[0].tool_calls"),
    ({"messages": None}, "body.messages"),
])
def test_an_unsupported_field_is_that_rows_error_naming_line_and_field(tmp_path, body, field):
    path = write_lines(tmp_path / "b.jsonl", [chat("ok"), chat("bad", **body), chat("ok2")])
    _, rows = requests_of(path)
    assert rows[0].error is None and rows[2].error is None
    assert rows[1].request is None
    assert "line 2 (custom_id 'bad')" in rows[1].error and field in rows[1].error, rows[1].error


@pytest.mark.parametrize("change, field", [
    ({"method": "GET"}, "method"), ({"url": "/v1/embeddings"}, "url"), ({"body": [1]}, "body"),
    ({"extra": 1}, "extra"),
])
def test_request_level_problems_are_row_errors(tmp_path, change, field):
    path = write_lines(tmp_path / "b.jsonl", [chat("ok"), {**chat("bad"), **change}])
    _, rows = requests_of(path)
    assert rows[1].error.startswith("row 1: line 2 (custom_id 'bad'): " + field), rows[1].error


def test_logprobs_request_until_the_engine_supports_it(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [chat("a", logprobs=True, top_logprobs=3), chat("b", logprobs=False)])
    _, rows = requests_of(path)
    assert rows[1].error is None
    if LOGPROBS:
        assert (rows[0].request.params.logprobs, rows[0].request.params.top_logprobs) == (True, 3)
    else:
        assert "line 1" in rows[0].error and "logprobs: not supported yet" in rows[0].error


def test_logprobs_mode_in_a_body_ours_or_vllms_name(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [
        chat("a", logprobs=True, logprobs_mode="processed"),
        chat("b", logprobs=True, logprobs_mode="processed_logprobs"),
        chat("c", logprobs=True, logprobs_mode="raw_logprobs"), chat("d", logprobs=True)])
    _, rows = requests_of(path)
    assert [r.request.params.logprobs_mode for r in rows] == ["processed", "processed", "raw", "raw"]


def test_duplicate_custom_ids_are_refused_at_plan_time_naming_the_lines(tmp_path):
    path = write_lines(tmp_path / "b.jsonl", [chat("a"), chat("b"), chat("a"), chat("c"), chat("a"), chat("b")])
    with pytest.raises(JobInputError) as e:
        open_inputs(path)
    assert "'a' on lines 1, 3, 5" in str(e.value) and "'b' on lines 2, 6" in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"", "has no requests"),
    (b"\n\n  \n", "has no requests"),
    (b'{"custom_id": "a", "body": {}}\n{"custom_id": "b", "body": \n', "line 2 is not valid JSON"),
    (b'{"custom_id": "a", "body": {}}\n[{"custom_id": "b"}]\n', "line 2 is an array, expected a JSON object"),
    (b'{"custom_id": "a", "body": {}}\n{"body": {}}\n', "line 2: 'custom_id' is missing"),
    (b'{"custom_id": "a", "body": {}}\n{"custom_id": 5, "body": {}}\n', "line 2: 'custom_id' is an integer"),
    (b'{"custom_id": "a", "body": {}}\n{"custom_id": "\xff\xfe", "body": {}}\n', "line 2 is not valid UTF-8"),
    (b'{"custom_id": "a", "body": {}}\n\n{"custom_id": "b", "body": {}}\n', "line 2 is blank"),
    (b'{"custom_id": "a", "body": {}}\n' + b"[" * 100000 + b"]" * 100000 + b"\n", "line 2 nests JSON too deeply"),
])
def test_hostile_openai_files_are_refused_with_the_line(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_bytes(content)
    with pytest.raises(JobInputError) as e:
        open_inputs(str(path), input_format="openai")
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_whole_json_array_file_and_a_huge_line_are_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / "array.jsonl"
    path.write_text(json.dumps([chat("a"), chat("b")], indent=1))
    with pytest.raises(JobInputError, match="line 1 is not valid JSON.*not a JSON array"):
        open_inputs(str(path))
    monkeypatch.setattr(lines, "MAX_LINE_BYTES", 1000)
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps(chat("a")) + "\n" + json.dumps(chat("b", stop="x" * 5000)) + "\n")
    with pytest.raises(JobInputError, match="line 2 is longer than"):
        open_inputs(str(huge))
    no_newline = tmp_path / "one.jsonl"
    no_newline.write_bytes(b"x" * 3000)  # a file without any newline is not read whole
    with pytest.raises(JobInputError, match="line 1 is longer than"):
        open_inputs(str(no_newline), input_format="jsonl")


def test_jsonl_columns_types_and_their_errors(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "a", "id": 1, "meta": {"k": [1]}, "max_tokens": 4, "stop": "s"},
        "",
        {"prompt": "b", "id": 2, "temperature": 1, "score": 1},
        {"prompt": "c", "score": 1.5, "flag": True},
    ])
    inputs, rows = requests_of(path)
    assert inputs.files[0].format == "jsonl" and inputs.text_column == "prompt"
    assert inputs.passthrough == ("id", "meta", "score", "flag")
    assert [r.request.prompt for r in rows] == ["a", "b", "c"]
    assert rows[0].request.params.max_tokens == 4 and rows[0].request.params.stop == ("s",)
    assert rows[1].request.params.temperature == 1.0
    ok = write_lines(tmp_path / "m.jsonl", [{"prompt": "a", "logprobs_mode": "processed"}, {"prompt": "b"},
                                            {"prompt": "c", "logprobs_mode": "both"}])
    _, moded = requests_of(ok)
    assert [r.request.params.logprobs_mode for r in moded[:2]] == ["processed", "raw"]
    assert moded[2].error.startswith("row 2: column 'logprobs_mode': logprobs_mode must be one of raw, processed")
    table = read_shard(inputs, plan_shards(inputs, 64)[0])
    assert table.column("meta").to_pylist() == ['{"k": [1]}', None, None]  # objects pass through as JSON text
    assert table.column("score").to_pylist() == [None, 1.0, 1.5]
    for bad, message in [
        ({"prompt": 5}, "line 2: field 'prompt' is an integer, expected a string"),
        ({"prompt": "x", "max_tokens": "9"}, "line 2: field 'max_tokens' is a string, expected an integer"),
        ({"prompt": "x", "logprobs_mode": True}, "line 2: field 'logprobs_mode' is a boolean, expected a string"),
        ({"messages": [{"role": "user"}]}, "line 2: field 'messages' is an array"),
        ({"prompt": "x", "id": "seven"}, "line 2: field 'id' is a string (string) but earlier lines have int64"),
        ([1, 2], "line 2 is an array, expected a JSON object"),
    ]:
        write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "id": 1}, bad])
        with pytest.raises(JobInputError) as e:
            open_inputs(str(tmp_path / "bad.jsonl"))
        assert message in str(e.value), str(e.value)


def test_jsonl_messages_and_input_format_override(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "custom_id": "x"}])
    assert open_inputs(path).files[0].format == "openai"  # custom_id on the first line: detected as OpenAI
    inputs, rows = requests_of(path, input_format="jsonl")
    assert inputs.files[0].format == "jsonl" and rows[0].request.messages == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        open_inputs(path, input_format="csv")


@pytest.mark.parametrize("fmt", ["openai", "jsonl"])
def test_shards_read_only_their_byte_ranges(tmp_path, monkeypatch, fmt):
    """Small chunks: every shard reads its own lines (not the file from the start), line numbers stay
    the file's, and every row comes out exactly once in order."""
    monkeypatch.setitem(formats.FORMATS, fmt, type(formats.FORMATS[fmt])(chunk_bytes=300))
    items = [chat(f"id{i}", max_tokens=i + 1) if i % 7 else chat(f"id{i}", tools=[{}]) for i in range(60)]
    if fmt == "jsonl":
        items = [{"prompt": f"p{i}", "id": i, **({"extra": "x" * i} if i % 5 == 0 else {})} for i in range(60)]
    path = write_lines(tmp_path / "f.jsonl", items)
    opened: list[tuple[int, int]] = []
    real = lines.read_range

    def spy(fs, p, first, stop, *args):
        opened.append((first, stop))
        return real(fs, p, first, stop, *args)

    monkeypatch.setattr(lines, "read_range", spy)
    inputs = open_inputs(path, input_format=fmt)
    assert len(inputs.files[0].chunk_rows) > 5
    shards = plan_shards(inputs, 4)
    rows = []
    for shard in shards:
        table = read_shard(inputs, shard)
        rows += table.to_pylist()
        reqs = to_requests(table, SPEC, inputs.text_column)
        if fmt == "openai":
            for row, req in zip(table.to_pylist(), reqs):
                i = row["row_index"]
                assert row["custom_id"] == f"id{i}" and row["input_line"] == i + 1
                assert (req.error is not None) == (i % 7 == 0)
                if req.error:
                    assert f"line {i + 1} (custom_id 'id{i}'): body.tools" in req.error
                else:
                    assert req.request.params.max_tokens == i + 1
    assert [r["row_index"] for r in rows] == list(range(60))
    # each read covers a shard's chunk or two; no two reads overlap and together they cover the file
    assert max(stop - first for first, stop in opened) <= 2
    covered = [c for first, stop in sorted(set(opened)) for c in range(first, stop)]
    assert covered == sorted(set(covered))
    assert {c for c, n in enumerate(inputs.files[0].chunk_rows) if n} <= set(covered)


def test_a_custom_id_in_two_files_of_one_job_is_refused_naming_both(tmp_path):
    (tmp_path / "d").mkdir()
    write_lines(tmp_path / "d" / "a.jsonl", [chat("x"), chat("y")])
    write_lines(tmp_path / "d" / "b.jsonl", [chat("z"), chat("y")])
    with pytest.raises(JobInputError) as e:
        open_inputs(str(tmp_path / "d"))
    assert f"'y' on line 2 of {tmp_path / 'd' / 'a.jsonl'} and line 2 of {tmp_path / 'd' / 'b.jsonl'}" in str(e.value)
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps(chat("z")) + "\n")
    assert open_inputs(str(tmp_path / "d")).num_rows == 3
