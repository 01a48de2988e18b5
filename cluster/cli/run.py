"""`ternpool generate`: one prompt through the engine in this process."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .options import add_model_options

log = logging.getLogger("ternpool")


def cmd_generate(args: argparse.Namespace) -> int:
    from ternpool.engine import Engine, Request, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    engine = Engine.load(args.model, threads=args.threads, slots=1, max_context=args.max_context, head=args.head,
                         weights_format=args.weights_format)
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
        print(json.dumps({"prompt_ids": list(res.prompt_token_ids), "output_ids": list(res.token_ids),
                          "text": res.text, "finish_reason": res.finish_reason}, ensure_ascii=False))
    else:
        print(res.text)
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
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the text")
    g.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    g.add_argument("--max-context", type=int, help="context length to allocate (default: 2048)")
    add_model_options(g)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_ids, output_ids, text, finish_reason")
    g.set_defaults(func=cmd_generate)
