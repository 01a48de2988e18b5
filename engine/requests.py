"""The engine's contract with the layers above: `SamplingParams`, `Request`, `Result`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Hashable, Sequence

FINISH_REASONS = ("stop", "length", "error")
MAX_LOGPROBS = 20  # most alternatives a token's logprobs list (OpenAI's limit for top_logprobs)
LOGPROBS_MODES = ("raw", "processed")  # vLLM's raw_logprobs / processed_logprobs
# what JSON outputs write for a log-probability of -inf (a token the sampler could not pick): JSON has
# no infinity, and OpenAI's and vLLM's servers write this same floor
JSON_LOGPROB_FLOOR = -9999.0


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class SamplingValueError(ValueError):
    """An impossible sampling value; `field` names the SamplingParams field (a job's column)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
CONSTRAINT_FIELDS = ("response_format", "guided_choice", "guided_regex")  # structured output: at most one


def _check_constraints(p: "SamplingParams") -> None:
    """Normalise (JSON text to a dict, a list of choices to a tuple) and validate the structured-output
    fields of `p`; SamplingValueError naming the field."""
    rf = p.response_format
    if isinstance(rf, str):
        try:
            rf = json.loads(rf)
        except ValueError as e:
            raise SamplingValueError("response_format", f"response_format is not valid JSON: {e}") from None
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in RESPONSE_FORMAT_TYPES:
            raise SamplingValueError("response_format", "response_format must be an object whose type is one of "
                                     f"{', '.join(RESPONSE_FORMAT_TYPES)}, got {rf!r}")
        if rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), (dict, bool)):
                raise SamplingValueError("response_format", "response_format of type json_schema needs "
                                         "json_schema.schema (a JSON schema object)")
        object.__setattr__(p, "response_format", rf)
    choice = p.guided_choice
    if choice is not None:
        if isinstance(choice, str) or not all(isinstance(c, str) and c for c in choice) or not len(choice):
            raise SamplingValueError("guided_choice", f"guided_choice must be a non-empty list of non-empty "
                                     f"strings, got {choice!r}")
        object.__setattr__(p, "guided_choice", tuple(choice))
    if p.guided_regex is not None and (not isinstance(p.guided_regex, str) or not p.guided_regex):
        raise SamplingValueError("guided_regex", f"guided_regex must be a non-empty string, got {p.guided_regex!r}")
    given = [n for n in CONSTRAINT_FIELDS
             if getattr(p, n) is not None and not (n == "response_format" and getattr(p, n)["type"] == "text")]
    if len(given) > 1:
        raise SamplingValueError(given[1], f"give at most one of response_format, guided_choice, guided_regex; "
                                 f"got {' and '.join(given)}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy; top_k 0 means off.
    `logprobs`: report each generated token's log-probability, with its `top_logprobs` (0..20; > 0
    implies logprobs) most likely alternatives; `prompt_logprobs` K (None: off): each prompt token's
    log-probability and its top K alternatives. `logprobs_mode` says which distribution the generated
    tokens' log-probabilities are of: "raw" (the default, vLLM's `raw_logprobs`) the model's own, the
    log_softmax of its logits before temperature, top-k, top-p and any structured-output mask;
    "processed" (vLLM's `processed_logprobs`) the one the token was drawn from, after all of those
    (-inf for a token the sampler could not pick; at temperature 0, the log_softmax of the masked
    logits). Prompt log-probabilities are always raw. max_tokens may be 0 when prompt_logprobs is set:
    a scoring request that only reads the prompt.
    An impossible value raises SamplingValueError naming its field."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    # structured output (engine/guided.py), at most one of the three: OpenAI's response_format
    # ({"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}, or
    # that as JSON text), a fixed set of answers, or a regular expression the whole output matches
    response_format: dict[str, Any] | None = None
    guided_choice: tuple[str, ...] | None = None
    guided_regex: str | None = None

    def __post_init__(self):
        _check_constraints(self)
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))

        def bad(field: str, message: str) -> SamplingValueError:
            return SamplingValueError(field, f"{message}, got {getattr(self, field)!r}")

        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise bad("max_tokens", "max_tokens must be an integer >= 1 (>= 0 with prompt_logprobs)")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise bad("temperature", "temperature must be a finite number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "top_p must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "top_k must be an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise bad("seed", "seed must be a non-negative integer or None")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "logprobs must be true or false")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise bad("top_logprobs", f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad("prompt_logprobs", f"prompt_logprobs must be None or an integer in 0..{MAX_LOGPROBS}")
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in LOGPROBS_MODES:
            raise bad("logprobs_mode", f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}")
        object.__setattr__(self, "logprobs", bool(self.logprobs) or self.top_logprobs > 0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingValueError("stop", f"stop strings must be non-empty strings, got {s!r}")


@dataclass(frozen=True)
class Request:
    """One prompt: plain text (`prompt`), chat turns (`messages`) or token ids
    (`prompt_token_ids`, used as given), exactly one of them."""

    key: Hashable
    prompt: str | None = None
    messages: Sequence[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_token_ids: Sequence[int] | None = None


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token and its log-probability (under the distribution the request's
    `logprobs_mode` names; raw for prompt tokens)."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token of a sequence, its log-probability (None for a prompt's first token, which nothing
    predicts) and the `top` most likely tokens at its position, most likely first."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """{token_id, token, logprob, top_logprobs: [{token_id, token, logprob}]}: the shape of the
        Parquet columns (which keep -inf) and, through `json_logprobs`, of `ternpool generate --json`."""
        return {"token_id": self.token_id, "token": self.token, "logprob": self.logprob,
                "top_logprobs": [{"token_id": a.token_id, "token": a.token, "logprob": a.logprob} for a in self.top]}


def json_logprobs(entries: list[dict] | None) -> list[dict] | None:
    """`TokenLogprob.to_dict` entries (or the Parquet column's rows) fit for JSON: a log-probability of
    -inf becomes JSON_LOGPROB_FLOOR, since JSON cannot carry it (json.dumps would write -Infinity)."""
    if entries is None:
        return None

    def floor(e: dict) -> dict:
        lp = e.get("logprob")
        return e if lp is None or lp > JSON_LOGPROB_FLOOR else dict(e, logprob=JSON_LOGPROB_FLOOR)

    return [dict(floor(e), top_logprobs=[floor(t) for t in e.get("top_logprobs") or ()]) for e in entries]


@dataclass(frozen=True)
class Result:
    """The outcome of one request. `text` excludes the stop string and the stop token;
    `token_ids` are all generated ids (including an end-of-sequence token that stopped it)."""

    key: Hashable
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    prompt_token_ids: tuple[int, ...] = ()
    time_to_first_token: float | None = None  # seconds from admission to the first generated token
    latency: float | None = None  # seconds from admission to the result
    # one TokenLogprob per generated token when params.logprobs, else None
    logprobs: tuple[TokenLogprob, ...] | None = None
    # one per prompt token when params.prompt_logprobs is set (the first one's logprob is None), else None
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # prompt tokens whose K and V came from the prefix cache instead of being computed (engine/blocks.py);
    # depends on what ran before, never changes the result
    cached_tokens: int = 0

    @classmethod
    def failed(cls, key: Hashable, error: str, prompt_tokens: int = 0) -> "Result":
        return cls(key, "", (), prompt_tokens, 0, "error", error)
