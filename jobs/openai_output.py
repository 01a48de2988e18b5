"""A finished job's output as OpenAI Batch output and error lines, made from the Parquet parts
(`read_output`, the exactly-once record) in input order: `output.jsonl` holds one line per request
that succeeded (`response.body` a `chat.completion` or `text_completion` object with usage),
`errors.jsonl` one per request that failed; together, exactly one line per request.

A row's endpoint is its `url` column (an OpenAI Batch input) or else the job's text column
(`messages`: chat completions, `prompt`: completions); its custom_id is its `custom_id` column, else
its `id`, else `row-<row_index>`. A `generated_logprobs` column (list of {token_id, token, logprob,
top_logprobs}) becomes each choice's `logprobs` in OpenAI's shape, a log-probability of -inf (processed
logprobs of a token the sampler could not pick) written as OpenAI's floor, -9999.0."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa

from ternpool.engine.requests import json_logprobs

from . import storage
from .formats.openai_batch import CHAT, COMPLETIONS
from .output import read_complete_output
from .storage import OPENAI_ERRORS_FILE, OPENAI_OUTPUT_FILE


def wants_openai(spec, inputs) -> bool:
    """True when a job ends by writing the OpenAI files: asked for, or its inputs are OpenAI Batch files."""
    return spec.output_format == "openai" or any(f.format == "openai" for f in inputs.files)


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """`choices[0].logprobs` of a chat completion: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None

    def one(e: dict) -> dict:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [dict(one(e), top_logprobs=[one(t) for t in e.get("top_logprobs") or ()])
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict] | None) -> dict | None:
    """`choices[0].logprobs` of a completion: tokens, token_logprobs, top_logprobs (token -> logprob)
    and text_offset (each token's character offset in the generated text)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs") or ()} for e in entries],
            "text_offset": offsets}


def _custom_id(row: dict) -> str:
    if row.get("custom_id") is not None:
        return str(row["custom_id"])
    return str(row["id"]) if row.get("id") is not None else f"row-{row['row_index']}"


def _body(row: dict, endpoint: str, model: str, created: int, job_id: str) -> dict:
    usage = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
             "total_tokens": row["prompt_tokens"] + row["completion_tokens"]}
    entries = json_logprobs(row.get("generated_logprobs"))
    if endpoint == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": row["generated_text"], "refusal": None},
                  "finish_reason": row["finish_reason"], "logprobs": chat_logprobs(entries)}
        return {"id": f"chatcmpl-{job_id}-{row['row_index']}", "object": "chat.completion", "created": created,
                "model": model, "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": row["generated_text"], "finish_reason": row["finish_reason"],
              "logprobs": completion_logprobs(entries)}
    return {"id": f"cmpl-{job_id}-{row['row_index']}", "object": "text_completion", "created": created,
            "model": model, "choices": [choice], "usage": usage}


def openai_lines(table: pa.Table, *, text_column: str, model: str, created: int,
                 job_id: str) -> Iterator[tuple[bool, dict]]:
    """(failed, line) for every row of an output table, in its order."""
    default = CHAT if text_column == "messages" else COMPLETIONS
    for row in table.to_pylist():
        custom_id = _custom_id(row)
        line_id = f"batch_req_{job_id}_{row['row_index']}"
        if row["error"] is not None or row["finish_reason"] == "error":
            error = {"code": "request_failed", "message": row["error"] or "the request failed"}
            if row.get("input_line") is not None:
                error["line"] = row["input_line"]
            yield True, {"id": line_id, "custom_id": custom_id, "response": None, "error": error}
            continue
        endpoint = row.get("url") if row.get("url") in (CHAT, COMPLETIONS) else default
        yield False, {"id": line_id, "custom_id": custom_id,
                      "response": {"status_code": 200, "request_id": f"req_{job_id}_{row['row_index']}",
                                   "body": _body(row, endpoint, model, created, job_id)},
                      "error": None}


def render(output: str) -> tuple[bytes, bytes, int, int]:
    """The output and error files of the job in `output` as bytes, and their line counts."""
    manifest, table = read_complete_output(output)
    about = manifest.about
    ok, failed = [], []
    for is_error, line in openai_lines(table, text_column=about.get("text_column", "messages"),
                                       model=about.get("model_name", "ternpool"),
                                       created=int(manifest.finished or manifest.created), job_id=manifest.job_id):
        (failed if is_error else ok).append(json.dumps(line, ensure_ascii=False))
    as_bytes = lambda lines: "".join(x + "\n" for x in lines).encode("utf-8")  # noqa: E731
    return as_bytes(ok), as_bytes(failed), len(ok), len(failed)


def openai_paths(output: str) -> tuple[str, str]:
    """OUT/output.jsonl and OUT/errors.jsonl as the output's filesystem names them."""
    _, base = storage.resolve(output)
    return storage.join(base, OPENAI_OUTPUT_FILE), storage.join(base, OPENAI_ERRORS_FILE)


def write_openai_files(output: str) -> tuple[str, str]:
    """Write OUT/output.jsonl and OUT/errors.jsonl (each atomically) from the parts of the finished
    job in `output`. Returns their paths."""
    fs, _ = storage.resolve(output)
    ok, failed, _, _ = render(output)
    paths = openai_paths(output)
    for path, data in zip(paths, (ok, failed)):
        storage.write_bytes_atomic(fs, path, data)
    return paths
