"""`ternpool generate`: one prompt through the engine in this process."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .options import add_engine_options, add_sampling_options, engine_config, sampling_params

log = logging.getLogger("ternpool")


def cmd_generate(args: argparse.Namespace) -> int:
    from ternpool.engine import Engine, Request
    from ternpool.engine.requests import json_logprobs

    params = sampling_params(args)
    engine = Engine.load(args.model, engine_config(args, slots=1))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        req = Request("cli", messages=messages, params=params)
    else:
        if args.system:
            raise SystemExit("--system needs --chat")
        req = Request("cli", prompt=args.prompt, params=params)
    (res,) = engine.generate([req])
    if res.error:
        print(f"error: {res.error}", file=sys.stderr)
        return 1
    if args.json:
        out = {"prompt_ids": list(res.prompt_token_ids), "output_ids": list(res.token_ids), "text": res.text,
               "finish_reason": res.finish_reason}
        for name, lps in (("logprobs", res.logprobs), ("prompt_logprobs", res.prompt_logprobs)):
            if lps is not None:
                out[name] = json_logprobs([t.to_dict() for t in lps])
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(res.text)
    if res.time_to_first_token is None:  # a scoring request (--max-tokens 0): nothing generated
        log.info("%d prompt tokens scored in %.3f s", res.prompt_tokens, res.latency)
        return 0
    decode = res.completion_tokens - 1
    rate = decode / (res.latency - res.time_to_first_token) if decode > 0 else float("nan")
    log.info("%d prompt tokens, first token after %.3f s (%.1f prompt tokens/s), %d more tokens at %.2f "
             "tokens/s, %s; peak RSS %.2f GB", res.prompt_tokens, res.time_to_first_token,
             res.prompt_tokens / res.time_to_first_token, decode, rate, res.finish_reason, _peak_rss() / 1e9)
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate text for one prompt",
                       description="Load a model directory (or Hub id) and generate for one prompt.")
    g.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    g.add_argument("--prompt", required=True, help="the prompt text (the user turn with --chat)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    add_sampling_options(g, job=False)
    add_engine_options(g, pool=False)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_ids, output_ids, text, finish_reason, and with --logprobs / "
                   "--prompt-logprobs also logprobs / prompt_logprobs: one {token_id, token, logprob, top_logprobs} "
                   "a token")
    g.set_defaults(func=cmd_generate)
