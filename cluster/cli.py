"""The `ternpool` command line: parses arguments and calls the layers below."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .cliopts import WEIGHTS_FORMATS, add_engine_options, add_sampling_options, engine_config, sampling_params

log = logging.getLogger("ternpool")


def _make_model(args: argparse.Namespace) -> int:
    from ternpool.engine.modelgen import make_model

    t0 = time.perf_counter()
    out = make_model(args.out, args.shape, layers=args.layers, vocab=args.vocab, seed=args.seed,
                     fmt=args.format, linear_class=args.linear_class, shards=args.shards)
    print(f"wrote {out} ({args.shape}, {args.format}, {args.linear_class}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from ternpool.engine import Engine, Request

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


def _convert(args: argparse.Namespace) -> int:
    from ternpool.engine.native import convert, native_specs
    from ternpool.engine import ModelConfig
    from tqdm import tqdm

    cfg = ModelConfig.from_dir(args.model)
    specs = native_specs(cfg, args.weights_format)
    t0 = time.perf_counter()
    with tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="convert",
              disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as pb:
        out = convert(args.model, args.out, args.weights_format, progress=lambda s: pb.update(s.nbytes))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({args.weights_format}, {size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_parser() -> argparse.ArgumentParser:
    from ternpool.engine.modelgen import FORMATS, SHAPES

    p = argparse.ArgumentParser(prog="ternpool", description="Batch inference of ternary (BitNet b1.58) "
                                "language models on CPU node pools.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-model", help="write a random BitNet model in the exact Hugging Face format",
                       description="Write a random ternary model (config, safetensors, tokenizer) for tests "
                       "and benchmarks. Shapes other than 'tiny' use Llama-3's tokenizer, which needs "
                       "`pip install 'ternpool[llama3]'`.")
    m.add_argument("--shape", default="tiny", choices=list(SHAPES), help="model shape (default: tiny)")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--layers", type=int, help="override the number of layers")
    m.add_argument("--vocab", type=int, help="override the vocabulary size (a small BPE is trained)")
    m.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    m.add_argument("--format", default="packed", choices=FORMATS,
                   help="packed: uint8 2-bit weights (like bitnet-b1.58-2B-4T); bf16: unpacked, "
                   "quantized at load (like the -bf16 repo)")
    m.add_argument("--linear-class", default="autobitlinear", choices=["autobitlinear", "bitlinear"],
                   help="weight_scale convention: autobitlinear multiplies, bitlinear divides")
    m.add_argument("--shards", type=int, default=1, help="number of safetensors files (default: 1)")
    m.set_defaults(func=_make_model)

    g = sub.add_parser("generate", help="generate text for one prompt",
                       description="Load a model directory (or Hub id) and generate for one prompt.")
    g.add_argument("--model", required=True, help="model directory or Hugging Face Hub id")
    g.add_argument("--prompt", required=True, help="the prompt text (the user turn with --chat)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    add_sampling_options(g, job=False)
    add_engine_options(g, pool=False)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: prompt_ids, output_ids, text, finish_reason")
    g.set_defaults(func=_generate)

    v = sub.add_parser("convert", help="convert a Hugging Face BitNet model into ternpool's native weight file",
                       description="Write the model in the layout the kernels read (one safetensors file, "
                       "format-versioned), to be memory-mapped: loads in milliseconds and is shared by every "
                       "process on a node. Streams tensor by tensor, so models larger than RAM convert. "
                       "Loading a Hugging Face model does this once automatically into the cache.")
    v.add_argument("model", help="Hugging Face model directory")
    v.add_argument("--out", required=True, help="output directory (must not exist)")
    v.add_argument("--weights-format", choices=WEIGHTS_FORMATS, default="2bit",
                   help="2bit (Hugging Face packing, default) or 1.6bit (base 3, 5 weights a byte)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=_convert)

    from .jobcli import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, ImportError, OSError) as e:
        print(f"ternpool {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
