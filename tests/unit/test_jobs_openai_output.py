"""OpenAI Batch output and error files made from a job's Parquet parts (in input order, one line per
request across both files, parsed by the official `openai` client's types), logprobs in OpenAI's
shapes from a synthetic `generated_logprobs` column, and `ternpool export`."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from ternpool.cluster.cli import main
from ternpool.engine.requests import Result
from ternpool.jobs import JobInputError, JobSpec, Manifest, open_inputs, plan_shards, read_output, read_shard, \
    result_table, to_requests, write_part
from ternpool.jobs.export import export
from ternpool.jobs.openai_output import write_openai_files

openai_types = pytest.importorskip("openai.types")
from openai.types import BatchError, Completion  # noqa: E402
from openai.types.chat import ChatCompletion  # noqa: E402

pytestmark = pytest.mark.unit

LOGPROBS_TYPE = pa.list_(pa.struct([
    ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()),
    ("top_logprobs", pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()),
                                         ("logprob", pa.float32())])))]))


def _logprobs(row_index: int, other: float = -3.0) -> list[dict] | None:
    """Synthetic logprobs of a row: two tokens with two alternatives each, the second of log-probability
    `other` (rows 1, 4, ...: none asked)."""
    if row_index % 3 == 1:
        return None
    return [{"token_id": 10 + k, "token": f"t{row_index}é{k}", "logprob": -0.5 * (k + 1),
             "top_logprobs": [{"token_id": 10 + k, "token": f"t{row_index}é{k}", "logprob": -0.5 * (k + 1)},
                              {"token_id": 99, "token": " x", "logprob": other}]} for k in range(2)]


def finished_job(tmp_path, lines: list[dict], *, logprobs: bool = False, shard_rows: int = 2,
                 output_format: str = "parquet", other: float = -3.0) -> str:
    """A finished job on a directory holding one input file of `lines`, without Ray: every request that
    converts 'generates' the text `out-<row_index>` (2 tokens); every third row fails in the engine."""
    src = tmp_path / "in" / "batch.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = JobSpec(str(src.parent), str(tmp_path / "out"), str(tmp_path / "my-model"), shard_rows=shard_rows,
                   output_format=output_format)
    inputs = open_inputs(spec.inputs)
    shards = plan_shards(inputs, shard_rows)
    manifest = Manifest.open(spec.output, spec, inputs, shards, {"name": "m"})
    for shard in reversed(shards):  # parts written out of order: the files follow the input's order
        table = read_shard(inputs, shard)
        results = {}
        for r in to_requests(table, spec, inputs.text_column):
            if r.error is not None:
                results[r.row_index] = Result.failed(r.row_index, r.error)
            elif r.row_index % 3 == 2:
                results[r.row_index] = Result.failed(r.row_index, "engine: prompt too long", prompt_tokens=9)
            else:
                results[r.row_index] = Result(r.row_index, f"out-{r.row_index}", (1, 2), 5 + r.row_index, 2,
                                              "length" if r.row_index % 2 else "stop")
        part = result_table(table, results, inputs.passthrough)
        if logprobs:  # what an engine asked for logprobs writes in the column result_table made
            at = part.schema.get_field_index("generated_logprobs")
            part = part.set_column(at, pa.field("generated_logprobs", LOGPROBS_TYPE),
                                   pa.array([_logprobs(i, other) for i in part.column("row_index").to_pylist()],
                                            LOGPROBS_TYPE))
        write_part(spec.output, shard.shard_id, part)
        manifest.record(shard.shard_id, part.num_rows, 0)
    return spec.output


def chat_line(i: int, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], **body}}


def completion_line(i: int, **body) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt-3.5-turbo-instruct", "prompt": f"q{i}", **body}}


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _check_files(output_path, errors_path, n: int, body_type) -> tuple[list[dict], list[dict]]:
    """Every line parses with the openai types; together the files hold each custom_id once, in order."""
    ok, failed = read_jsonl(output_path), read_jsonl(errors_path)
    for line in ok:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = body_type.model_validate(line["response"]["body"])
        assert not body.model_extra and not body.choices[0].model_extra  # nothing the type does not know
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    for line in failed:
        assert line["response"] is None and set(line) == {"id", "custom_id", "response", "error"}
        assert BatchError.model_validate(line["error"]).message
    ids = [line["custom_id"] for line in ok + failed]
    assert sorted(ids, key=lambda c: int(c.split("-")[1])) == [f"req-{i}" for i in range(n)]
    assert [line["custom_id"] for line in ok] == sorted((line["custom_id"] for line in ok),
                                                        key=lambda c: int(c.split("-")[1]))
    return ok, failed


def test_chat_job_output_and_errors_files(tmp_path):
    lines = [chat_line(i) for i in range(7)]
    lines[3] = chat_line(3, tools=[{"type": "function"}])
    out = finished_job(tmp_path, lines)
    written = write_openai_files(out)
    ok, failed = _check_files(*written, 7, ChatCompletion)
    assert [x["custom_id"] for x in failed] == ["req-2", "req-3", "req-5"]
    assert failed[1]["error"]["line"] == 4 and "body.tools" in failed[1]["error"]["message"]
    assert "prompt too long" in failed[0]["error"]["message"]
    first = ChatCompletion.model_validate(ok[0]["response"]["body"])
    assert (first.object, first.model, first.choices[0].message.content, first.choices[0].finish_reason) == \
        ("chat.completion", "my-model", "out-0", "stop")
    assert ChatCompletion.model_validate(ok[1]["response"]["body"]).choices[0].finish_reason == "length"
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (5, 2)
    assert first.choices[0].logprobs is None
    # written again, byte for byte the same (the output's ids and times come from the manifest)
    before = [open(p, "rb").read() for p in written]
    write_openai_files(out)
    assert [open(p, "rb").read() for p in written] == before


def test_completions_job_and_logprobs_in_both_shapes(tmp_path):
    out = finished_job(tmp_path, [completion_line(i) for i in range(6)], logprobs=True)
    ok, _ = _check_files(*write_openai_files(out), 6, Completion)
    by_id = {line["custom_id"]: Completion.model_validate(line["response"]["body"]) for line in ok}
    assert by_id["req-0"].object == "text_completion" and by_id["req-0"].choices[0].text == "out-0"
    lp = by_id["req-3"].choices[0].logprobs
    assert lp.tokens == ["t3é0", "t3é1"] and lp.token_logprobs == [-0.5, -1.0]
    assert lp.top_logprobs == [{"t3é0": -0.5, " x": -3.0}, {"t3é1": -1.0, " x": -3.0}]
    assert lp.text_offset == [0, 4]
    assert by_id["req-1"].choices[0].logprobs is None  # not asked: null

    chat_out = finished_job(tmp_path / "c", [chat_line(i) for i in range(6)], logprobs=True)
    ok, _ = _check_files(*write_openai_files(chat_out), 6, ChatCompletion)
    body = ChatCompletion.model_validate(ok[2]["response"]["body"])  # row 3
    content = body.choices[0].logprobs.content
    assert [c.token for c in content] == ["t3é0", "t3é1"] and [c.logprob for c in content] == [-0.5, -1.0]
    assert content[0].bytes == list("t3é0".encode()) and len(content[0].bytes) == 5
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [("t3é1", -1.0), (" x", -3.0)]


def test_minus_infinity_is_written_as_openais_floor_in_json_and_kept_in_parquet(tmp_path):
    """Processed logprobs give -inf to tokens the sampler could not pick: JSON has no such number."""
    def strict(path):
        def refuse(constant):
            raise AssertionError(f"{path}: not JSON: {constant}")

        with open(path, encoding="utf-8") as f:
            return [json.loads(line, parse_constant=refuse) for line in f]

    out = finished_job(tmp_path, [chat_line(i) for i in range(4)], logprobs=True, other=float("-inf"))
    assert read_output(out).to_pylist()[0]["generated_logprobs"][0]["top_logprobs"][1]["logprob"] == float("-inf")
    ok = strict(write_openai_files(out)[0])
    content = ChatCompletion.model_validate(ok[0]["response"]["body"]).choices[0].logprobs.content
    assert [t.logprob for t in content[0].top_logprobs] == [-0.5, -9999.0]
    export(out, "jsonl", str(tmp_path / "rows.jsonl"))
    rows = strict(tmp_path / "rows.jsonl")
    assert [t["logprob"] for t in rows[0]["generated_logprobs"][1]["top_logprobs"]] == [-1.0, -9999.0]
    completions = finished_job(tmp_path / "c", [completion_line(i) for i in range(4)], logprobs=True,
                               other=float("-inf"))
    body = Completion.model_validate(strict(write_openai_files(completions)[0])[0]["response"]["body"])
    assert body.choices[0].logprobs.top_logprobs[0] == {"t0é0": -0.5, " x": -9999.0}


def test_output_format_openai_for_a_jsonl_job_uses_id_and_text_column(tmp_path):
    src = [{"prompt": f"p{i}", "id": f"req-{i}"} for i in range(4)]
    out = finished_job(tmp_path, src, output_format="openai")
    ok, failed = _check_files(*write_openai_files(out), 4, Completion)
    assert len(ok) == 3 and len(failed) == 1


def test_an_incomplete_job_is_not_written(tmp_path):
    out = finished_job(tmp_path, [chat_line(i) for i in range(5)])
    manifest = Manifest.load(out)
    del manifest.completed[1]
    manifest.save()
    with pytest.raises(JobInputError, match="holds 3 of the job's 5 rows"):
        write_openai_files(out)


def test_export_formats_refusals_and_force(tmp_path, capsys):
    out = finished_job(tmp_path, [chat_line(i) for i in range(5)])
    target = tmp_path / "res.jsonl"
    assert main(["export", out, "--format", "openai", "--to", str(target)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {target} (4 lines)" in printed and f"wrote {tmp_path / 'res.errors.jsonl'} (1 lines)" in printed
    assert read_jsonl(target) == read_jsonl(write_openai_files(out)[0])
    # an existing file is refused, and kept as it was; --force replaces it
    target.write_text("mine\n")
    assert main(["export", out, "--format", "openai", "--to", str(target)]) == 2
    assert "exists" in capsys.readouterr().err and target.read_text() == "mine\n"
    assert main(["export", out, "--format", "openai", "--to", str(target), "--force"]) == 0
    assert len(read_jsonl(target)) == 4
    # never inside OUT, nor inside the inputs (its directory included), even with --force
    for bad in (f"{out}/x.jsonl", str(tmp_path / "in" / "batch.jsonl"), str(tmp_path / "in" / "new.jsonl")):
        assert main(["export", out, "--format", "jsonl", "--to", bad, "--force"]) == 2
        assert "choose" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["batch.jsonl"]
    # jsonl: the output rows; parquet: the same table
    assert main(["export", out, "--format", "jsonl", "--to", str(tmp_path / "rows.jsonl")]) == 0
    rows = read_jsonl(tmp_path / "rows.jsonl")
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(5)]
    assert rows[0]["generated_text"] == "out-0" and rows[2]["finish_reason"] == "error"
    export(out, "parquet", str(tmp_path / "all.parquet"))
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "all.parquet").equals(read_output(out))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporaries left behind


def test_submit_options_reach_the_job_spec():
    from ternpool.cluster.cli import build_parser
    from ternpool.cluster.cli.jobs import _job_kwargs
    from ternpool.jobs.openai_output import wants_openai

    args = build_parser().parse_args(["submit", "in.parquet", "-m", "m", "-o", "o", "--output-format", "openai",
                                      "--input-format", "jsonl"])
    spec = JobSpec("in.parquet", "o", "m", **_job_kwargs(args))
    assert (spec.input_format, spec.output_format) == ("jsonl", "openai")
    default = JobSpec("in.parquet", "o", "m", **_job_kwargs(build_parser().parse_args(
        ["submit", "in.parquet", "-m", "m", "-o", "o"])))
    assert (default.input_format, default.output_format) == (None, "parquet")

    class Inputs:
        def __init__(self, *names):
            self.files = [type("F", (), {"format": n})() for n in names]

    assert wants_openai(spec, Inputs("parquet")) and wants_openai(default, Inputs("parquet", "openai"))
    assert not wants_openai(default, Inputs("parquet", "jsonl"))
    with pytest.raises(ValueError, match="output_format"):
        JobSpec("in.parquet", "o", "m", output_format="csv")
