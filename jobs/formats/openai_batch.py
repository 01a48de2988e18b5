"""OpenAI Batch input files: one request per line, `{"custom_id", "method": "POST", "url", "body"}`,
`url` `/v1/chat/completions` (`body.messages`) or `/v1/completions` (`body.prompt`). Chunks are
byte ranges of lines (`lines.py`); blank lines may only end the file, so a request's line number
is its row number in the file plus one.

Each line becomes one row: `custom_id`, `url`, `input_line` (passed through to the output, where
`jobs/openai_output.py` makes OpenAI's output and error lines of them), the text column and the
sampling columns `body` sets (a field left out takes the job's default), with OpenAI's
`response_format` and vLLM's `guided_choice` / `guided_regex` extras as the row's constraint (at most
one), and `logprobs_mode` ("raw" or "processed", or vLLM's names "raw_logprobs" /
"processed_logprobs": vLLM sets the mode per server, with --logprobs-mode; ternpool per request).
What would change the result and ternpool does not do (`tools`, `n` > 1, `logit_bias`, another
`url`, ...) makes the row an error naming the line and field (the `ROW_ERROR` column, which
`rows.to_requests` honours). A line that is not a JSON object, has no string `custom_id`, or repeats
one, refuses the job."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ternpool.engine.requests import CONSTRAINT_FIELDS, LOGPROBS_MODES, SamplingParams, SamplingValueError

from ..errors import JobInputError
from ..spec import SAMPLING_COLUMNS
from . import lines
from .jsonl import MESSAGES_TYPE, STOP_TYPE
from .protocol import ROW_ERROR, FileLayout

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TEXT_COLUMN = {CHAT: "messages", COMPLETIONS: "prompt"}
# logprobs are honoured once SamplingParams has these fields (until then such a row is an error)
LOGPROBS = {"logprobs", "top_logprobs"} <= set(SAMPLING_COLUMNS)
IGNORED = frozenset({"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SAMPLING_TYPES = [("max_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()),
                   ("seed", pa.int64()), ("stop", STOP_TYPE),
                   ("response_format", pa.string()),  # as JSON text
                   ("guided_choice", pa.list_(pa.string())), ("guided_regex", pa.string())]  # vLLM's extras
if LOGPROBS:
    _SAMPLING_TYPES += [("logprobs", pa.bool_()), ("top_logprobs", pa.int64()), ("logprobs_mode", pa.string())]
# body.logprobs_mode: ours, or vLLM's name for the same mode (its --logprobs-mode)
_LOGPROBS_MODES = {**{m: m for m in LOGPROBS_MODES}, **{f"{m}_logprobs": m for m in LOGPROBS_MODES}}
# the JSON shape of the structured-output fields a body may carry (SamplingParams checks the rest)
_CONSTRAINT_JSON = {"response_format": (dict, "an object"), "guided_choice": (list, "an array of strings"),
                    "guided_regex": (str, "a string")}
# fields with a value that changes nothing: anything else unsupported is a row error
_NEUTRAL: dict[str, Any] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                            "stream": False, "echo": False, "best_of": 1, "suffix": None}


class RowError(Exception):
    """One request that cannot run as asked; the message names the field."""


def schema(endpoint: str) -> pa.Schema:
    return pa.schema([("custom_id", pa.string()), ("url", pa.string()), ("input_line", pa.int64()),
                      (TEXT_COLUMN[endpoint], pa.string() if endpoint == COMPLETIONS else MESSAGES_TYPE),
                      *_SAMPLING_TYPES, (ROW_ERROR, pa.string())])


def claims(first: Any) -> bool:
    """True when the first line of a `.jsonl` file looks like an OpenAI Batch request."""
    return isinstance(first, dict) and ("custom_id" in first or "body" in first)


def _int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(f"body.{name}: expected an integer, got {lines.type_name(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RowError(f"body.{name}: {value} is outside {low}..{high}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"body.{name}: expected a number, got {lines.type_name(value)}")
    return float(value)


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError("body.messages: expected a non-empty array of messages"
                       + ("" if value is not None else " (it is missing)"))
    out = []
    for i, message in enumerate(value):
        where = f"body.messages[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{where}: expected an object, got {lines.type_name(message)}")
        for key in message:
            if key not in ("role", "content", "name"):
                raise RowError(f"{where}.{key}: not supported (tool calls, audio and refusals are not)")
        role = message.get("role")
        if role not in _ROLES:
            raise RowError(f"{where}.role: {role!r} is not supported (supported: {', '.join(_ROLES)})")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RowError(f"{where}.content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RowError(f"{where}.content: expected a string or text parts, got {lines.type_name(content)}")
        out.append({"role": _ROLES[role], "content": content})
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise RowError("body.prompt: expected a string" + (
            " (it is missing)" if value is None else f", got {lines.type_name(value)} (one prompt per request)"))
    return value


def _logprobs(endpoint: str, body: dict) -> dict[str, Any]:
    asked = body.get("logprobs")
    if endpoint == COMPLETIONS:  # an integer: how many alternatives (0..5)
        if asked is None:
            return {}
        top = _int("logprobs", asked, 0, 5)
        values = {"logprobs": True, "top_logprobs": top}
    else:
        if asked is not None and not isinstance(asked, bool):
            raise RowError(f"body.logprobs: expected a boolean, got {lines.type_name(asked)}")
        top = body.get("top_logprobs")
        if top is not None:
            _int("top_logprobs", top, 0, 20)
            if not asked:
                raise RowError("body.top_logprobs: needs body.logprobs true")
        if not asked:
            return {}
        values = {"logprobs": True, "top_logprobs": top or 0}
    if not LOGPROBS:
        raise RowError("logprobs: not supported yet")
    return values


def request_row(endpoint: str, request: dict) -> dict[str, Any]:
    """The columns of one request (not custom_id, url, input_line): text and sampling values.
    RowError naming the field when the request asks for what ternpool does not do."""
    method = request.get("method", "POST")
    if method != "POST":
        raise RowError(f"method: {method!r} is not supported (POST)")
    for key in request:
        if key not in ("custom_id", "method", "url", "body"):
            raise RowError(f"{key}: not an OpenAI Batch request field")
    url = request.get("url")
    if url not in TEXT_COLUMN:
        raise RowError(f"url: {url!r} is not supported (supported: {CHAT}, {COMPLETIONS})")
    if url != endpoint:
        raise RowError(f"url: {url!r} differs from this file's endpoint {endpoint!r} (its first line's); "
                       "a batch file has one endpoint")
    body = request.get("body")
    if not isinstance(body, dict):
        raise RowError(f"body: expected an object, got {lines.type_name(body)}")
    text_key = "messages" if endpoint == CHAT else "prompt"
    row: dict[str, Any] = {TEXT_COLUMN[endpoint]: _messages(body.get("messages")) if endpoint == CHAT
                           else _prompt(body.get("prompt"))}
    for name, value in body.items():
        if name in (text_key, "logprobs", "top_logprobs") or name in IGNORED or value is None:
            continue
        if name in ("max_tokens", "max_completion_tokens"):
            row["max_tokens"] = _int(name, value, 1)
        elif name in ("temperature", "top_p"):
            row[name] = _number(name, value)
        elif name == "seed":
            row["seed"] = _int(name, value)
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise RowError("body.stop: expected a string or an array of strings")
            row["stop"] = value
        elif name in CONSTRAINT_FIELDS:
            row[name] = value  # checked together below: at most one
        elif name == "logprobs_mode" and LOGPROBS:
            if not isinstance(value, str) or value not in _LOGPROBS_MODES:
                raise RowError(f"body.logprobs_mode: {value!r} is not supported (one of {', '.join(_LOGPROBS_MODES)})")
            row["logprobs_mode"] = _LOGPROBS_MODES[value]
        elif name in _NEUTRAL:
            if value != _NEUTRAL[name]:
                raise RowError(f"body.{name}: {value!r} is not supported (only {_NEUTRAL[name]!r})")
        else:
            raise RowError(f"body.{name}: not supported")
    _check_constraint(row)
    row.update(_logprobs(endpoint, body))
    return row


def _check_constraint(row: dict[str, Any]) -> None:
    """Validate the row's structured-output fields together (their shapes, at most one of them), as
    SamplingParams does for Parquet and JSON Lines rows, and keep `response_format` as JSON text."""
    given = {name: row[name] for name in CONSTRAINT_FIELDS if name in row}
    for name, (json_type, expected) in _CONSTRAINT_JSON.items():
        if name in given and not isinstance(given[name], json_type):
            raise RowError(f"body.{name}: expected {expected}, got {lines.type_name(given[name])}")
    try:
        SamplingParams(**given)
    except SamplingValueError as exc:
        raise RowError(f"body.{exc.field}: {exc}") from None
    if "response_format" in row:
        row["response_format"] = json.dumps(row["response_format"])


def _line_row(endpoint: str, line: lines.Line) -> dict[str, Any]:
    request = line.value
    row: dict[str, Any] = {"custom_id": request["custom_id"], "url": request.get("url"),
                           "input_line": line.number}
    if not isinstance(row["url"], str):
        row["url"] = None
    try:
        row.update(request_row(endpoint, request))
    except RowError as exc:
        row[ROW_ERROR] = f"line {line.number} (custom_id {request['custom_id']!r}): {exc}"
    return row


def _check_line(line: lines.Line) -> str:
    """The custom_id of a line; JobInputError naming the line when it has none."""
    if not isinstance(line.value, dict):
        raise JobInputError(f"line {line.number} is {lines.type_name(line.value)}, expected a JSON object "
                            '{"custom_id", "method", "url", "body"}')
    custom_id = line.value.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise JobInputError(f"line {line.number}: 'custom_id' is "
                            + ("missing" if custom_id is None else lines.type_name(custom_id))
                            + ", expected a non-empty string")
    return custom_id


def _endpoint(first: Any) -> str:
    url = first.get("url") if isinstance(first, dict) else None
    return url if url in TEXT_COLUMN else CHAT


class OpenAIBatchFormat:
    """`InputFormat` for OpenAI Batch input files (`.jsonl` whose first line has custom_id/body)."""

    name = "openai"
    label = "OpenAI Batch"
    suffixes = (".jsonl",)

    def __init__(self, chunk_bytes: int = lines.CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes

    def claims(self, first: Any) -> bool:
        return claims(first)

    def describe(self, fs: pafs.FileSystem, path: str, size: int) -> FileLayout:
        counts: dict[int, int] = {}
        first_line: dict[str, int] = {}  # custom_id -> its first line
        repeated: dict[str, list[int]] = {}
        repeated_lines = 0
        endpoint = None
        try:
            for chunk, line in lines.scan(fs, path, self.chunk_bytes):
                custom_id = _check_line(line)
                if line.number != len(first_line) + repeated_lines + 1:
                    raise JobInputError(f"line {len(first_line) + repeated_lines + 1} is blank; an OpenAI "
                                        "Batch file has one request on every line")
                if endpoint is None:
                    endpoint = _endpoint(line.value)
                if custom_id in first_line:
                    repeated.setdefault(custom_id, [first_line[custom_id]]).append(line.number)
                    repeated_lines += 1
                else:
                    first_line[custom_id] = line.number
                counts[chunk] = counts.get(chunk, 0) + 1
        except JobInputError as exc:
            raise JobInputError(f"input file {path}: {exc}") from None
        if not counts:
            raise JobInputError(f"input file {path} has no requests (it is empty or blank)")
        if repeated:
            shown = "; ".join(f"{cid!r} on lines {', '.join(map(str, nums))}"
                              for cid, nums in list(repeated.items())[:10])
            raise JobInputError(f"input file {path}: {len(repeated)} custom_id(s) appear more than once "
                                f"({shown}{'; ...' if len(repeated) > 10 else ''}); each request needs its own")
        return FileLayout(sum(counts.values()), lines.chunk_rows(counts), schema(endpoint), first_line)

    def read_chunks(self, fs: pafs.FileSystem, path: str, chunk_rows: tuple[int, ...],
                    chunks: list[int], read_ahead: int) -> tuple[pa.Table, list[int]]:
        first = next(lines.scan(fs, path, self.chunk_bytes))[1]  # its url is the file's endpoint
        endpoint = _endpoint(first.value)
        before = sum(chunk_rows[:chunks[0]])
        # no blank line before the last request (describe checks it): the line number is the row's
        found = lines.read_range(fs, path, chunks[0], chunks[-1] + 1, self.chunk_bytes, before + 1)
        expected = sum(chunk_rows[c] for c in chunks)
        if len(found) != expected or (found and found[-1].number != before + expected):
            raise JobInputError(f"the file changed since the job was planned ({expected} requests expected "
                                f"in chunks {chunks[0]}..{chunks[-1]}, {len(found)} found)")
        rows = []
        for line in found:
            _check_line(line)
            rows.append(_line_row(endpoint, line))
        out_schema = schema(endpoint)
        table = pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in out_schema},
                         schema=out_schema)
        return table, list(chunks)
