"""An OpenAI Batch input file through `ternpool submit` on the embedded cluster with a tiny generated
model: OUT/output.jsonl and OUT/errors.jsonl hold one line per request, parsed by the openai client's
types, their texts are the Parquet parts' texts, and a rerun writes them again without computing."""

from __future__ import annotations

import json

import pytest

from ternpool.jobs import read_output

from helpers import run_cli

openai_types = pytest.importorskip("openai.types")
from openai.types import BatchError  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

pytestmark = pytest.mark.cluster


def test_openai_batch_file_through_the_cli(tmp_path, tiny_model):
    requests = [{"custom_id": f"task-{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o-mini", "max_tokens": 3 + i % 4,
                          "messages": [{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": f"Question number {i}?"}]}}
                for i in range(9)]
    requests[4]["body"]["tools"] = [{"type": "function", "function": {"name": "f"}}]
    requests[6]["body"]["temperature"] = 0.8
    requests[6]["body"]["seed"] = 5
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out"
    args = ["submit", str(src), "--model", tiny_model, "--output", str(out), "--shard-rows", "4", "--slots", "4",
            "--threads-per-worker", "1", "--metrics-port", "-1", "--no-progress"]
    run = run_cli(*args, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"openai: {out / 'output.jsonl'} and {out / 'errors.jsonl'}" in run.stdout

    ok = [json.loads(x) for x in (out / "output.jsonl").read_text().splitlines()]
    failed = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in ok] == [f"task-{i}" for i in range(9) if i != 4]
    assert [x["custom_id"] for x in failed] == ["task-4"]
    assert BatchError.model_validate(failed[0]["error"]).line == 5 and "body.tools" in failed[0]["error"]["message"]
    table = read_output(str(out)).to_pylist()
    texts = {r["custom_id"]: r for r in table}
    for line in ok:
        body = ChatCompletion.model_validate(line["response"]["body"])
        row = texts[line["custom_id"]]
        assert body.choices[0].message.content == row["generated_text"]
        assert body.usage.completion_tokens == row["completion_tokens"] <= 3 + int(line["custom_id"][5:]) % 4
        assert body.choices[0].finish_reason == row["finish_reason"]

    # the output files are ours: rerunning finds nothing to do and writes them again, the same
    before = (out / "output.jsonl").read_bytes()
    (out / "output.jsonl").unlink()
    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout and (out / "output.jsonl").read_bytes() == before


def test_structured_output_through_submit(tmp_path, tiny_model):
    """body.response_format json_schema rows and a job-wide --choice, through real workers."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                              "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    requests = [{"custom_id": f"t{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"messages": [{"role": "user", "content": f"Q{i}"}], "max_tokens": 40, "seed": i,
                          "temperature": 1.0,
                          "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}}
                for i in range(4)]
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    common = ["--slots", "4", "--threads-per-worker", "1", "--metrics-port", "-1", "--no-progress"]
    run = run_cli("submit", str(src), "--model", tiny_model, "--output", str(tmp_path / "out"), *common, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "output.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        choice = line["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"P{i}"}) + "\n" for i in range(5)))
    run = run_cli("submit", str(plain), "--model", tiny_model, "--output", str(tmp_path / "out2"), "--choice",
                  "alpha,beta", *common, timeout=600)
    assert run.returncode == 0, run.stderr
    assert set(read_output(str(tmp_path / "out2")).column("generated_text").to_pylist()) <= {"alpha", "beta"}
