"""`ternpool make-model | convert`: write a random model in the Hugging Face format; convert one into
ternpool's native weight file."""

from __future__ import annotations

import argparse
import sys
import time

from .options import WEIGHTS_FORMATS


def cmd_make_model(args: argparse.Namespace) -> int:
    from ternpool.engine.modelgen import make_model

    t0 = time.perf_counter()
    out = make_model(args.out, args.shape, layers=args.layers, vocab=args.vocab, seed=args.seed,
                     fmt=args.format, linear_class=args.linear_class, shards=args.shards)
    print(f"wrote {out} ({args.shape}, {args.format}, {args.linear_class}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
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


def add_commands(sub) -> None:
    from ternpool.engine.modelgen import FORMATS, SHAPES

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
    m.set_defaults(func=cmd_make_model)

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
    v.set_defaults(func=cmd_convert)
