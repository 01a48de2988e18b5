"""Structured output (engine/guided.py) on a random model, which never writes valid JSON by chance:
every constrained row that stops is valid (jsonschema), one of its choices or a full regex match;
max_tokens truncation says length; a bad constraint fails only its row; batching changes nothing;
the job columns, the job-wide CLI flags and an OpenAI batch line's response_format (and vLLM's
guided_choice / guided_regex extras)."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.model import BitNetModel
from ternpool.engine.requests import Result, SamplingValueError

from helpers import run_one_shard

jsonschema = pytest.importorskip("jsonschema")

pytestmark = pytest.mark.unit

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
TRICKY = {
    "nested": {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}},
        "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
             "required": ["color", "ok"], "additionalProperties": False},
    "min_items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[0-9]{3}-[a-z]{2}$"}},
                "required": ["code"], "additionalProperties": False},
    "person": PERSON,
}
CHOICES = ("yes", "no", "maybe so")
REGEX = r"[0-9]{3}-[a-z]{2,4}"


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}


def _engine(base: Engine, slots: int) -> Engine:
    return Engine(BitNetModel(base.model.weights, slots=slots, max_context=256, head=base.model.head),
                  base.tokenizer, base.threads)


def _requests(seeds=range(4), max_tokens: int = 48) -> list[Request]:
    reqs = []
    for seed in seeds:
        for name, schema in TRICKY.items():
            reqs.append(Request((name, seed), prompt="Describe it", params=SamplingParams(
                max_tokens=max_tokens, temperature=1.0, seed=seed, response_format=schema_format(schema))))
        reqs.append(Request(("choice", seed), prompt="Answer", params=SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed, guided_choice=CHOICES)))
        reqs.append(Request(("regex", seed), prompt="Code", params=SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed, guided_regex=REGEX)))
        reqs.append(Request(("json_object", seed), prompt="Any", params=SamplingParams(
            max_tokens=max_tokens, temperature=0.7, seed=seed, response_format='{"type": "json_object"}')))
    return reqs


def check_valid(key, result: Result) -> None:
    """A stopped constrained result is what its constraint says."""
    kind = key[0]
    assert result.finish_reason == "stop", (key, result)
    if kind == "choice":
        assert result.text in CHOICES
    elif kind == "regex":
        assert re.fullmatch(REGEX, result.text), result.text
    elif kind == "json_object":
        assert isinstance(json.loads(result.text), dict), result.text
    else:
        jsonschema.validate(json.loads(result.text), TRICKY[kind])


@pytest.mark.parametrize("kwargs, field", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": "{not json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": "yes"}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),
])
def test_impossible_constraints_name_their_field(kwargs, field):
    with pytest.raises(SamplingValueError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_text_format_is_no_constraint_and_json_text_becomes_a_dict():
    assert SamplingParams(response_format='{"type": "json_object"}').response_format == {"type": "json_object"}
    assert SamplingParams(response_format={"type": "text"}, guided_regex="a").guided_regex == "a"
    assert SamplingParams(guided_choice=["a", "b"]).guided_choice == ("a", "b")


def test_every_stopped_constrained_row_is_valid_and_truncated_rows_say_length(tiny_engine):
    results = tiny_engine.generate(_requests())
    stopped = 0
    for req, res in zip(_requests(), results):
        assert res.error is None, (req.key, res.error)
        if res.finish_reason == "stop":
            check_valid(req.key, res)
            stopped += 1
        else:
            assert res.finish_reason == "length" and res.completion_tokens == req.params.max_tokens
    assert stopped >= len(results) * 3 // 4, f"only {stopped} of {len(results)} constrained rows completed"
    for res in tiny_engine.generate(_requests(seeds=[0], max_tokens=2)):
        if res.finish_reason == "length":  # json cannot be complete in 2 tokens; a choice may be
            assert res.completion_tokens == 2
    short = tiny_engine.generate([Request("p", prompt="x", params=SamplingParams(
        max_tokens=2, response_format=schema_format(PERSON)))])[0]
    assert short.finish_reason == "length" and short.text.startswith("{")


def test_an_unconstrained_random_model_does_not_write_valid_json(tiny_engine):
    """What makes the test above strong: without the masks the same rows are not valid."""
    plain = [Request(r.key, prompt=r.prompt, params=SamplingParams(max_tokens=48, temperature=1.0, seed=r.params.seed))
             for r in _requests(seeds=[0, 1])]
    for req, res in zip(plain, tiny_engine.generate(plain)):
        with pytest.raises(Exception):
            check_valid(req.key, res)


def test_a_bad_schema_or_regex_fails_only_its_row(tiny_engine):
    reqs = [Request("ok", prompt="a", params=SamplingParams(max_tokens=40, response_format=schema_format(PERSON))),
            Request("bad_pattern", prompt="a", params=SamplingParams(response_format=schema_format(
                {"type": "string", "pattern": "[0-9"}))),
            Request("bad_regex", prompt="a", params=SamplingParams(guided_regex="(a")),
            Request("bad_type", prompt="a", params=SamplingParams(response_format=schema_format({"type": 7}))),
            Request("plain", prompt="a", params=SamplingParams(max_tokens=3))]
    ok, *bad, plain = tiny_engine.generate(reqs)
    assert ok.error is None and plain.error is None and plain.completion_tokens == 3
    for res, field in zip(bad, ("response_format", "guided_regex", "response_format")):
        assert res.finish_reason == "error" and res.error.startswith(field + ":"), res.error
    # the same bad schema again: the cached compile error, not a crash
    again = tiny_engine.generate([reqs[1]])[0]
    assert again.error == bad[0].error


def test_batched_equals_unbatched_and_unconstrained_rows_are_untouched(tiny_engine):
    reqs = _requests(seeds=[5]) + [Request(("plain", i), prompt=p, params=SamplingParams(max_tokens=12, temperature=0.8,
                                                                                         seed=i))
                                   for i, p in enumerate(["Hello there", "Once upon"])]
    batched = _engine(tiny_engine, slots=4).generate(reqs)
    alone = [_engine(tiny_engine, slots=1).generate([r])[0] for r in reqs]
    assert [(r.text, r.token_ids, r.finish_reason) for r in batched] == \
        [(r.text, r.token_ids, r.finish_reason) for r in alone]


def test_the_mask_keeps_raw_logprobs_and_greedy_follows_the_grammar(tiny_engine):
    res = tiny_engine.generate([Request("c", prompt="a", params=SamplingParams(guided_choice=CHOICES, top_logprobs=2))])[0]
    assert res.text in CHOICES and res.finish_reason == "stop"
    assert all(t.logprob <= 0 for t in res.logprobs) and len(res.logprobs) == len(res.token_ids)


def _run_job(tmp_path, src, engine, **spec_kwargs):
    from ternpool.jobs import read_output

    _, _, spec = run_one_shard(tmp_path, src, engine, **spec_kwargs)
    return spec, read_output(spec.output).to_pylist()


def test_a_job_with_mixed_constrained_and_unconstrained_rows(tmp_path, tiny_engine):
    src = tmp_path / "p.parquet"
    n = 8
    pq.write_table(pa.table({
        "prompt": [f"Prompt {i}" for i in range(n)],
        "response_format": pa.array([json.dumps(schema_format(PERSON)), None, None, None, '{"type": "json_object"}',
                                     "{broken", None, None], pa.string()),
        "guided_choice": pa.array([None, ["red", "blue"], None, None, None, None, None, []], pa.list_(pa.string())),
        "guided_regex": pa.array([None, None, "[a-c]{4}", None, None, None, None, None], pa.string()),
        "temperature": pa.array([1.0] * n),
        "max_tokens": pa.array([60] * n, pa.int64()),
    }), src)
    # the job's default (--choice yes,no) applies to rows 3 and 6; a row's own constraint replaces it
    _, rows = _run_job(tmp_path, src, tiny_engine, sampling=SamplingParams(guided_choice=("yes", "no")))
    assert [r["row_index"] for r in rows] == list(range(n))
    if rows[0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(rows[0]["generated_text"]), PERSON)
    assert rows[0]["generated_text"].startswith("{")
    assert rows[1]["generated_text"] in ("red", "blue") and rows[1]["finish_reason"] == "stop"
    assert rows[2]["finish_reason"] == "stop" and re.fullmatch("[a-c]{4}", rows[2]["generated_text"])
    assert rows[3]["generated_text"] in ("yes", "no") and rows[6]["generated_text"] in ("yes", "no")
    assert rows[4]["generated_text"].startswith("{")
    if rows[4]["finish_reason"] == "stop":
        assert isinstance(json.loads(rows[4]["generated_text"]), dict)
    assert "row 5" in rows[5]["error"] and "'response_format'" in rows[5]["error"]
    assert "row 7" in rows[7]["error"] and "'guided_choice'" in rows[7]["error"]


def test_a_struct_response_format_column(tmp_path, tiny_engine):
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"],
                             "response_format": [{"type": "json_object"}, {"type": "text"}]}), src)
    _, rows = _run_job(tmp_path, src, tiny_engine, sampling=SamplingParams(max_tokens=30))
    assert rows[0]["error"] is None and rows[0]["generated_text"].startswith("{")
    assert rows[1]["error"] is None and rows[1]["completion_tokens"] == 30  # text: unconstrained


def test_openai_batch_lines_with_json_schema_choice_and_regex_through_a_job(tmp_path, tiny_engine):
    from ternpool.jobs.openai_output import write_openai_files

    body = {"model": "m", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 60, "temperature": 1.0}
    constraints = [{"response_format": schema_format(PERSON)}] * 4 + [{"guided_choice": list(CHOICES)},
                                                                       {"guided_regex": REGEX}]
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": dict(body, seed=i, **c)}) + "\n" for i, c in enumerate(constraints)))
    spec, rows = _run_job(tmp_path, src, tiny_engine)
    output, errors = write_openai_files(spec.output)
    lines = [json.loads(x) for x in open(output)]
    assert len(lines) == 6 and open(errors).read() == ""
    texts = [line["response"]["body"]["choices"][0]["message"]["content"] for line in lines]
    stopped = 0
    for line, text in zip(lines[:4], texts):
        if line["response"]["body"]["choices"][0]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(text), PERSON)
            stopped += 1
    assert stopped >= 2
    assert [line["response"]["body"]["choices"][0]["finish_reason"] for line in lines[4:]] == ["stop", "stop"]
    assert texts[4] in CHOICES and re.fullmatch(REGEX, texts[5]), texts[4:]


def test_cli_generate_with_a_json_schema_file_and_its_errors(tmp_path, tiny_model):
    from tests.helpers import run_cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    r = run_cli("generate", "--model", tiny_model, "--prompt", "Hi", "--json-schema", str(schema), "--max-tokens", "60")
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout.strip().splitlines()[-1]), PERSON)
    schema.write_text('{"type": ')
    r = run_cli("generate", "--model", tiny_model, "--prompt", "Hi", "--json-schema", str(schema))
    assert r.returncode != 0 and str(schema) in r.stderr and "line 1" in r.stderr


def test_json_lines_rows_carry_the_constraint_fields(tmp_path, tiny_engine):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "a", "guided_choice": ["up", "down"]},
        {"prompt": "b", "response_format": {"type": "json_object"}, "max_tokens": 40},
        {"prompt": "c", "guided_regex": "[xy]{3}"},
        {"prompt": "d", "guided_choice": "up"},
    ]) + "\n")
    from ternpool.jobs import JobInputError, open_inputs

    with pytest.raises(JobInputError, match="line 4: field 'guided_choice'"):
        open_inputs(str(src))
    src.write_text("\n".join(src.read_text().splitlines()[:3]) + "\n")
    _, rows = _run_job(tmp_path, src, tiny_engine)
    assert rows[0]["generated_text"] in ("up", "down") and rows[0]["finish_reason"] == "stop"
    assert rows[1]["error"] is None and rows[1]["generated_text"].startswith("{")
    assert re.fullmatch("[xy]{3}", rows[2]["generated_text"])


def test_a_job_wide_constraint_that_cannot_compile_is_refused_before_any_compute(tmp_path):
    from ternpool.jobs import JobSpec

    with pytest.raises(ValueError, match="(?s)JobSpec.sampling: guided_regex: .*unclosed"):
        JobSpec("in.parquet", str(tmp_path / "out"), "m", sampling=SamplingParams(guided_regex="[0-9"))
    with pytest.raises(ValueError, match="JobSpec.sampling: response_format: type must be"):
        JobSpec("in.parquet", str(tmp_path / "out"), "m", sampling=SamplingParams(response_format=schema_format({"type": 7})))
    spec = JobSpec("in.parquet", str(tmp_path / "out"), "m", sampling=SamplingParams(guided_choice=("a", "b")))
    assert spec.sampling_defaults()["guided_choice"] == ["a", "b"]
    assert "guided_choice" not in JobSpec("in.parquet", str(tmp_path / "out"), "m").sampling_defaults()
