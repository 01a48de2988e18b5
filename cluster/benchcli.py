"""`ternpool bench kernels | model | head | memory`: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .cliopts import add_model_options

log = logging.getLogger("ternpool")

DEFAULT_CACHE = Path.home() / ".cache" / "ternpool" / "bench-models"


def _shape_model(shape: str) -> str:
    """A random model of a named shape, made once into a cache directory."""
    from ternpool.engine.modelgen import make_model

    out = DEFAULT_CACHE / shape
    if not (out / "config.json").exists():
        log.warning("making a random %s model in %s (once)", shape, out)
        make_model(out, shape)
    return str(out)


def cmd_bench_kernels(args) -> int:
    from ternpool.engine.modelgen import SHAPES
    from ternpool.engine.shapes import linear_shapes
    from ternpool.kernels import set_threads
    from ternpool.kernels.bench import bench_linears, read_bandwidth
    from ternpool.kernels.config import ISA

    threads = set_threads(args.threads)
    shape = SHAPES[args.shape]
    shapes = linear_shapes(shape)
    shapes.pop("v_proj", None)  # same shape as k_proj
    batches = tuple(int(b) for b in args.batches.split(","))
    bw, bw1 = read_bandwidth(), read_bandwidth(parallel=False)
    rows = bench_linears(shapes, batches=batches, vocab=shape.vocab_size if args.head else None)
    print(f"shape {args.shape}, {threads} threads, ISA {ISA}; memory read bandwidth (sum of 1 GiB): "
          f"{bw / 1e9:.1f} GB/s with {threads} threads, {bw1 / 1e9:.1f} GB/s with NumPy's one")
    print(f"{'kernel':<10}{'format':>7}{'out x in':>14}{'batch':>6}{'ms':>9}{'GMAC/s':>8}{'weight GB/s':>12}"
          f"{'of read bw':>11}{'numpy f32 ms':>13}{'vs numpy':>9}")
    for r in rows:
        print(f"{r['name']:<10}{r['format']:>7}{r['out']:>8} x {r['in']:<5}{r['batch']:>6}{r['seconds'] * 1e3:9.3f}"
              f"{r['gmacs']:8.1f}"
              f"{r['weight_gbs']:12.1f}{r['weight_gbs'] * 1e9 / bw:11.2f}{r['numpy_f32_seconds'] * 1e3:13.3f}"
              f"{r['vs_numpy_f32']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "threads": threads, "isa": ISA,
                                               "read_bandwidth": bw,
                                               "read_bandwidth_numpy_one_thread": bw1, "rows": rows}, indent=2))
    return 0


def cmd_bench_model(args) -> int:
    from ternpool.engine.bench import bench_model
    from ternpool.kernels import set_threads
    from ternpool.kernels.bench import read_bandwidth

    model = resolve_model(args)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    set_threads(args.threads)  # the bandwidth is measured with the threads the model runs with
    bw = read_bandwidth()
    r = bench_model(model, threads=args.threads, prompt_len=args.prompt_len, gen=args.gen,
                    concurrency=concurrency, head=args.head, weights_format=args.weights_format)
    per_token = r["bytes_per_token"]
    r.update(read_bandwidth=bw, ceiling_tokens_per_s=bw / per_token)
    print(f"{model}: {r['threads']} threads, {r['weights_format']} weights, head {args.head}, ISA {r['isa']}, "
          f"load {r['load_s']:.2f} s (weights mapped in {r['load_weights_s']:.3f} s, tokenizer "
          f"{r['load_tokenizer_s']:.2f} s), "
          f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, of which at most "
          f"{r['kv_bytes_per_slot'] * r['slots'] / 1e9:.2f} GB KV cache ({r['slots']} slots x "
          f"{r['kv_bytes_per_slot'] / 1e6:.1f} MB)")
    print(f"prefill {args.prompt_len} tokens: {r['prefill_tokens_per_s']:.1f} tokens/s (time to first token "
          f"{r['ttft_s']:.3f} s)")
    print(f"single-stream decode: {r['decode_tokens_per_s']:.2f} tokens/s; bytes read per token "
          f"{per_token / 1e6:.0f} MB, read bandwidth {bw / 1e9:.1f} GB/s -> ceiling {bw / per_token:.2f} tokens/s "
          f"({r['decode_tokens_per_s'] * per_token / bw:.2f} of it)")
    for c, v in r["concurrency"].items():
        print(f"concurrency {c:>3}: aggregate decode {v['aggregate_decode_tokens_per_s']:8.1f} tokens/s, "
              f"{v['tokens_per_s_incl_prefill']:8.1f} tokens/s including prefill")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    return 0


def cmd_bench_head(args) -> int:
    from ternpool.engine.bench import head_agreement

    model = resolve_model(args)
    r = head_agreement(model, prompts=args.prompts, prompt_len=args.prompt_len, threads=args.threads)
    miss = r["median_exact_margin_on_misses"]
    print(f"{model}: int8 head top-1 agrees with the bf16 head at {r['top1_agreement'] * 100:.2f}% of "
          f"{r['positions']} positions ({r['misses']} misses"
          + (f", median bf16 top-2 margin on them {miss:.3g}; logit std {r['logit_spread']:.3g})" if miss is not None
             else ")"))
    print(f"head time for those positions: bf16 {r['seconds']['bf16']:.2f} s, int8 {r['seconds']['int8']:.2f} s "
          f"({r['seconds']['bf16'] / r['seconds']['int8']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def cmd_bench_memory(args) -> int:
    from ternpool.engine.bench import memory_sharing

    model = resolve_model(args)
    r = memory_sharing(model, workers=args.workers, head=args.head, weights_format=args.weights_format)
    gb = 1e9
    for i, w in enumerate(r["per_worker"]):
        print(f"worker {i}: RSS {w['rss'] / gb:.2f} GB, PSS {w['pss'] / gb:.2f} GB; of which the mapped weight file "
              f"RSS {w['file_rss'] / gb:.2f} GB, PSS {w['file_pss'] / gb:.2f} GB")
    print(f"{r['workers']} workers together: RSS {r['total_rss'] / gb:.2f} GB, PSS {r['total_pss'] / gb:.2f} GB; "
          f"weight file pages resident {r['weights_rss'] / gb:.2f} GB counted once by PSS as "
          f"{r['weights_pss'] / gb:.2f} GB (file {r['weights_file_bytes'] / gb:.2f} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def add_model_source(p, default_shape: str = "2b4t") -> None:
    from ternpool.engine.modelgen import SHAPES

    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model directory")
    src.add_argument("--shape", default=default_shape, choices=list(SHAPES),
                     help=f"a random model of this shape, made once under ~/.cache/ternpool (default: {default_shape})")


def resolve_model(args) -> str:
    """--model, or the cached random model of --shape (made on first use)."""
    return args.model or _shape_model(args.shape)


def add_bench_commands(bsub) -> None:
    from ternpool.engine.modelgen import SHAPES

    k = bsub.add_parser("kernels", help="time every linear shape and the output head at several batch sizes",
                        description="Per linear shape of the model and the output head, at each batch size: time "
                        "per call, G multiply-adds/s, effective weight GB/s, and NumPy float32 matmul on the same "
                        "shape, with this machine's read bandwidth measured in the same run.")
    k.add_argument("--shape", default="2b4t", choices=list(SHAPES), help="model shape (default: 2b4t)")
    k.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    k.add_argument("--batches", default="1,8,32,64", help="batch sizes (default: 1,8,32,64)")
    k.add_argument("--no-head", dest="head", action="store_false", help="skip the output head")
    k.add_argument("--json", help="also write the numbers to this JSON file")
    k.set_defaults(func=cmd_bench_kernels)

    m = bsub.add_parser("model", help="prefill, time to first token, decode and batched decode of a model",
                        description="Prefill tokens/s, time to first token, single-stream decode tokens/s (with "
                        "the bandwidth ceiling measured in the same run) and aggregate decode at each concurrency "
                        "under continuous batching, as the worker pool runs it; peak RSS.")
    add_model_source(m)
    m.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    m.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    m.add_argument("--gen", type=int, default=128, help="generated tokens per sequence (default: 128)")
    m.add_argument("--concurrency", default="1,8,32,64", help="concurrent sequences (default: 1,8,32,64)")
    add_model_options(m)
    m.add_argument("--json", help="also write the numbers to this JSON file")
    m.set_defaults(func=cmd_bench_model)

    h = bsub.add_parser("head", help="top-1 agreement and speed of the int8 output head against the bf16 one",
                        description="Runs random prompts through the model and compares, at every position, the "
                        "int8 head's top token with the exact bf16 head's, and times both heads.")
    add_model_source(h)
    h.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    h.add_argument("--prompts", type=int, default=8, help="random prompts (default: 8)")
    h.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (default: 128)")
    h.add_argument("--json", help="also write the numbers to this JSON file")
    h.set_defaults(func=cmd_bench_head)

    s = bsub.add_parser("memory", help="RSS and PSS of several workers loading the same model on one node",
                        description="Starts N processes that each load the model and generate a few tokens, then "
                        "measures each one's RSS and PSS (proportional set size) while all are alive: the mapped "
                        "weight file is shared through the page cache, so its PSS adds up to about one copy.")
    add_model_source(s)
    s.add_argument("--workers", type=int, default=2, help="processes (default: 2)")
    add_model_options(s)
    s.add_argument("--json", help="also write the numbers to this JSON file")
    s.set_defaults(func=cmd_bench_memory)
