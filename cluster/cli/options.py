"""Command-line options shared by several commands: the engine's (`engine_config` builds the one
`EngineConfig` from them) and the sampling ones (`sampling_params`). Imports neither Numba nor Ray."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ternpool.engine.options import DEFAULT_MAX_CONTEXT, DEFAULT_SLOTS, HEADS, KV_CACHES, WEIGHTS_FORMATS, EngineConfig
from ternpool.engine.requests import CONSTRAINT_FIELDS, LOGPROBS_MODES, SamplingParams

_SAMPLING = SamplingParams()  # the defaults


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--head and --weights-format: how the model is held in memory."""
    p.add_argument("--head", choices=HEADS, default=EngineConfig.head,
                   help="output head: int8 (default: the embedding quantized per row, faster decode; top-1 "
                   "agrees with bf16 but for near-ties) or bf16 (exact: what transformers computes)")
    p.add_argument("--weights-format", choices=WEIGHTS_FORMATS, default=None,
                   help="ternary weights in memory: 2bit (fastest batched) or 1.6bit (5 weights a byte, 20%% "
                   "fewer bytes per token). A Hugging Face model is converted once into the cache "
                   "(TERNPOOL_CACHE_DIR, default ~/.cache/ternpool); a converted model keeps its own "
                   "format (default: 2bit)")


def add_kv_cache_option(p: argparse.ArgumentParser) -> None:
    """--kv-cache: the dtype of the K and V caches."""
    p.add_argument("--kv-cache", choices=KV_CACHES, default=EngineConfig.kv_cache,
                   help="K and V cache: f32 (exact, default); bf16 (half the memory per slot and half the "
                   "attention's reads; K and V rounded to bf16, so greedy tokens may differ after a while); int8 "
                   "(about a quarter of f32's memory and reads, so ~4x the slots; K and V quantized per token and "
                   "KV head, a little noisier than bf16: greedy tokens differ somewhat more often)")


def add_engine_options(p: argparse.ArgumentParser, *, pool: bool) -> None:
    """The engine's options: threads (per worker in a pool), slots (a pool's only: one prompt needs
    one), context, prefix cache, KV cache, head and weights format."""
    if pool:
        p.add_argument("--threads-per-worker", dest="threads", type=int,
                       help="Numba threads (CPUs) per worker (default: all of the node's)")
        p.add_argument("--slots", type=int, help=f"sequences each worker decodes at once (default: {DEFAULT_SLOTS}, where "
                       "aggregate decode stops growing; fewer when their KV cache would take more than half of a "
                       "node's free memory)")
        p.add_argument("--max-context", type=int,
                       help=f"context length per slot (default: {DEFAULT_MAX_CONTEXT} or the model's)")
    else:
        p.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
        p.add_argument("--max-context", type=int, help=f"context length to allocate (default: {DEFAULT_MAX_CONTEXT})")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every prompt whole: do not keep prompts' KV blocks to reuse for later prompts "
                   "that start with the same tokens (the default reuses them; results are bit for bit the same "
                   "either way, so this is for measuring)")
    add_kv_cache_option(p)
    add_model_options(p)


def engine_config(args: argparse.Namespace, **fixed) -> EngineConfig:
    """The EngineConfig of a command: every EngineConfig field its arguments have, then `fixed`."""
    given = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}
    return EngineConfig(**{**given, **fixed})


def add_sampling_options(p: argparse.ArgumentParser, *, job: bool) -> None:
    """--max-tokens, --temperature, --top-p, --top-k, --seed, --stop: of one prompt, or a job's defaults
    (`job`: per-row columns override them, and --seed is the job seed)."""
    d, of = _SAMPLING, ("default " if job else "")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help=f"{of}tokens to generate{' per row' if job else ''} at most (default: {d.max_tokens})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"{of}temperature; 0 is greedy (default: {d.temperature:g})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"{of}nucleus sampling mass (default: {d.top_p})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"{of}top-k: sample from the k most likely tokens (0: off, the default)")
    if job:
        p.add_argument("--seed", type=int, default=0, help="job seed: rows without a seed get one derived from it "
                       "and their row_index (default: 0)")
    else:
        p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append",
                   help=f"{of}stop string (repeatable); not included in the text")
    p.add_argument("--logprobs", type=int, metavar="K",
                   help="report each generated token's log-probability and its K most likely alternatives "
                   "(0..20; 0: the token's only), of the distribution --logprobs-mode names"
                   + (", in the generated_logprobs column (the job's default: a row's logprobs / "
                      "top_logprobs columns override it)" if job else ""))
    p.add_argument("--logprobs-mode", choices=LOGPROBS_MODES, default=_SAMPLING.logprobs_mode,
                   help="which distribution --logprobs reports: raw (default; vLLM's raw_logprobs) the model's own, "
                   "before temperature, top-k, top-p and structured output; processed (vLLM's processed_logprobs) the "
                   "one the token was drawn from, after all of them (-inf, -9999.0 in JSON, for a token it could not "
                   "pick). Prompt logprobs are always raw"
                   + (" (the job's default: a row's logprobs_mode column overrides it)" if job else "")),
    p.add_argument("--prompt-logprobs", type=int, metavar="K",
                   help="report each prompt token's log-probability and its K most likely alternatives "
                   "(0..20); with --max-tokens 0 the prompt is only scored"
                   + (", in the prompt_token_logprobs column (the job's default: a row's prompt_logprobs column "
                      "overrides it)" if job else ""))

    rows = " (the job's default: a row's response_format / guided_choice / guided_regex column replaces it)" \
        if job else ""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE",
                   help="structured output: the text is JSON valid against the JSON schema in FILE" + rows)
    g.add_argument("--json-object", action="store_true",
                   help="structured output: the text is a JSON object (OpenAI's json_object)" + rows)
    g.add_argument("--choice", metavar="A,B,C",
                   help="structured output: the text is exactly one of these comma-separated strings" + rows)
    g.add_argument("--regex", metavar="PATTERN",
                   help="structured output: the whole text matches this regular expression" + rows)


def _response_format(args: argparse.Namespace) -> dict | None:
    if getattr(args, "json_object", False):
        return {"type": "json_object"}
    path = getattr(args, "json_schema", None)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ValueError(f"--json-schema {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # json.JSONDecodeError names line and column
        raise ValueError(f"--json-schema {path}: not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"--json-schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    return {"type": "json_schema", "json_schema": {"name": "cli", "schema": schema}}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of `add_sampling_options`' arguments."""
    special = ("stop", "logprobs", "top_logprobs") + CONSTRAINT_FIELDS
    choice = getattr(args, "choice", None)
    return SamplingParams(**{f.name: getattr(args, f.name) for f in fields(SamplingParams) if f.name not in special},
                          stop=tuple(args.stop or ()), logprobs=args.logprobs is not None,
                          top_logprobs=args.logprobs or 0, response_format=_response_format(args),
                          guided_choice=None if choice is None else tuple(choice.split(",")),
                          guided_regex=getattr(args, "regex", None))
