"""`ternpool bench kernels | model | head | memory | pool | cluster | prefix`: benchmarks that print ratios measured side
by side in one run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .options import add_kv_cache_option, add_model_options, engine_config

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


def _bandwidth_text(bw: dict) -> str:
    return (f"{bw['bytes_per_s'] / 1e9:.1f} GB/s with {bw['threads']} thread{'s' if bw['threads'] > 1 else ''} "
            f"(best of {bw['passes']} passes over {bw['buffer_bytes'] / 2 ** 30:.2f} GiB; median "
            f"{bw['median_bytes_per_s'] / 1e9:.1f})")


def cmd_bench_kernels(args) -> int:
    from ternpool.engine.bench import bench_kernels
    from ternpool.kernels.bench import describe_kernel_path

    r = bench_kernels(args.shape, threads=args.threads, batches=tuple(int(b) for b in args.batches.split(",")),
                      head=args.head)
    bw = r["read_bandwidth"]
    print(f"shape {args.shape}, {r['threads']} threads; {describe_kernel_path(r['kernel_path'])}")
    print(f"memory read bandwidth: {_bandwidth_text(r['bandwidth'])}, {_bandwidth_text(r['bandwidth_one_thread'])}")
    print(f"{'kernel':<10}{'format':>7}{'out x in':>14}{'batch':>6}{'ms':>9}{'GMAC/s':>8}{'weight GB/s':>12}"
          f"{'of read bw':>11}{'numpy f32 ms':>13}{'vs numpy':>9}")
    for row in r["rows"]:
        print(f"{row['name']:<10}{row['format']:>7}{row['out']:>8} x {row['in']:<5}{row['batch']:>6}"
              f"{row['seconds'] * 1e3:9.3f}{row['gmacs']:8.1f}{row['weight_gbs']:12.1f}"
              f"{row['weight_gbs'] * 1e9 / bw:11.2f}{row['numpy_f32_seconds'] * 1e3:13.3f}{row['vs_numpy_f32']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def decode_line(r: dict) -> str:
    """The single-stream decode against its bandwidth ceiling, as `bench model` prints it: a decode
    faster than the ceiling is reported as a bandwidth measurement too low, never as a fraction > 1."""
    per_token, bw = r["bytes_per_token"], r["read_bandwidth"]
    head = (f"single-stream decode: {r['decode_tokens_per_s']:.2f} tokens/s reading {per_token / 1e6:.0f} MB per "
            f"token ({r['decode_read_bytes_per_s'] / 1e9:.1f} GB/s); read bandwidth {bw / 1e9:.1f} GB/s -> ceiling "
            f"{r['ceiling_tokens_per_s']:.2f} tokens/s")
    if r["fraction_of_ceiling"] is not None:
        return f"{head} ({r['fraction_of_ceiling']:.2f} of it)"
    return (f"{head}: the decode beat that ceiling, which is impossible: the bandwidth measurement was too low, "
            f"by at least {r['bandwidth_low_by']:.2f}x (the decode itself read "
            f"{r['decode_read_bytes_per_s'] / 1e9:.1f} GB/s)")


def cmd_bench_model(args) -> int:
    from ternpool.engine.bench import bench_model
    from ternpool.engine.footprint import kv_pool_text
    from ternpool.kernels.bench import describe_kernel_path

    model = resolve_model(args)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    r = bench_model(model, threads=args.threads, prompt_len=args.prompt_len, gen=args.gen,
                    concurrency=concurrency, head=args.head, weights_format=args.weights_format,
                    kv_cache=args.kv_cache)
    print(f"{model}: {r['threads']} threads, {r['weights_format']} weights, head {args.head}, "
          f"load {r['load_s']:.2f} s (weights mapped in {r['load_weights_s']:.3f} s, tokenizer "
          f"{r['load_tokenizer_s']:.2f} s), "
          f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB")
    print(kv_pool_text(r["slots"], r["max_context"], r["kv_bytes_per_slot"], r["kv_cache"]))
    print(describe_kernel_path(r["kernel_path"]))
    print(f"memory read bandwidth: {_bandwidth_text(r['bandwidth'])}")
    print(f"prefill {args.prompt_len} tokens: {r['prefill_tokens_per_s']:.1f} tokens/s (time to first token "
          f"{r['ttft_s']:.3f} s)")
    print(decode_line(r))
    for c, v in r["concurrency"].items():
        print(f"concurrency {c:>3}: aggregate decode {v['aggregate_decode_tokens_per_s']:8.1f} tokens/s, "
              f"{v['tokens_per_s_incl_prefill']:8.1f} tokens/s including prefill")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    return 0


def cmd_bench_head(args) -> int:
    from ternpool.engine.bench import head_agreement

    model = resolve_model(args)
    r = head_agreement(model, prompts=args.prompts, prompt_len=args.prompt_len, threads=args.threads, gen=args.gen)
    miss = r["median_exact_margin_on_misses"]
    print(f"{model}: int8 head top-1 agrees with the bf16 head at {r['top1_agreement'] * 100:.2f}% of "
          f"{r['positions']} positions ({r['misses']} misses"
          + (f", median bf16 top-2 margin on them {miss:.3g}; logit std {r['logit_spread']:.3g})" if miss is not None
             else ")"))
    print(f"head time for those positions: bf16 {r['seconds']['bf16']:.2f} s, int8 {r['seconds']['int8']:.2f} s "
          f"({r['seconds']['bf16'] / r['seconds']['int8']:.2f}x)")
    if r["greedy_tokens"]:
        first = r["greedy_first_difference"]
        same = sum(f is None for f in first)
        print(f"greedy, {len(first)} prompts x {r['greedy_tokens']} tokens: {same} identical with either head; "
              f"the others first differ at token {sorted(f for f in first if f is not None)}")
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


def cmd_bench_pool(args) -> int:
    from ternpool.cluster.bench_pool import bench_pool, print_bench_pool

    print_bench_pool(bench_pool(args.model, rows=args.rows, max_tokens=args.max_tokens, slots=args.slots,
                                threads=args.threads, shard_rows=args.shard_rows, json_path=args.json))
    return 0


def cmd_bench_cluster(args) -> int:
    from ternpool.cluster.bench_cluster import bench_cluster, coordinator_capacity, print_legend, print_run

    nodes = tuple(int(n) for n in args.nodes.split(","))
    if not nodes or min(nodes) < 1:
        raise ValueError(f"--nodes must list node counts >= 1, got {args.nodes!r}")
    model = resolve_model(args)
    rows = args.rows or 2 * args.streams * max(nodes)
    print(f"{rows} prompts x {args.max_tokens} tokens, shards of {args.shard_rows} rows; per node "
          f"{args.cpus_per_node} CPU(s), one worker with {args.streams} streams; head {args.head}", flush=True)
    first = [True]

    def show(run: dict) -> None:
        print_run(run, header=first[0])
        first[0] = False

    r = bench_cluster(model, nodes=nodes, cpus_per_node=args.cpus_per_node, streams=args.streams, rows=rows,
                      max_tokens=args.max_tokens, shard_rows=args.shard_rows, head=args.head,
                      weights_format=args.weights_format, object_store_mb=args.object_store_mb, on_result=show)
    print_legend()
    if args.coordinator_shards:
        c = coordinator_capacity(shards=args.coordinator_shards, shard_rows=args.shard_rows)
        one = r["runs"][0]
        per_node = one["rows_per_s"] / one["nodes"]
        r["coordinator_capacity"] = c
        print(f"coordinator alone, {c['shards']} synthetic shards of {c['shard_rows']} rows: {c['first_ms']:.2f} ms "
              f"per shard for the first, {c['last_ms']:.2f} ms for the last (manifest {c['manifest_bytes'] / 1e6:.2f} "
              f"MB): {c['shards_per_s_last']:.0f} shards/s = {c['shards_per_s_last'] * c['shard_rows']:.0f} rows/s; "
              f"one node here did {per_node:.2f} rows/s, so one coordinator keeps about "
              f"{c['shards_per_s_last'] * c['shard_rows'] / per_node:.0f} such nodes busy")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def cmd_bench_prefix(args) -> int:
    from ternpool.cluster.bench_prefix import bench_prefix

    parts = tuple(args.parts.split(","))
    unknown = set(parts) - {"shared", "distinct", "routing"}
    if unknown or not parts:
        raise ValueError(f"--parts takes shared, distinct and routing, comma-separated; got {args.parts!r}")
    bench_prefix(resolve_model(args), rows=args.rows, instruction_words=args.instruction_words,
                 tail_words=args.tail_words, max_tokens=args.max_tokens, threads=args.threads,
                 shard_rows=args.shard_rows, distinct_rows=args.distinct_rows, instructions=args.instructions,
                 nodes=args.nodes, parts=parts, engine=engine_config(args), json_path=args.json,
                 on_line=lambda line: print(line, flush=True))
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


def add_commands(sub) -> None:
    from ternpool.engine.modelgen import SHAPES

    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios measured in one run")
    bsub = b.add_subparsers(dest="bench", required=True)

    k = bsub.add_parser("kernels", help="time every linear shape and the output head at several batch sizes",
                        description="Per linear shape of the model and the output head, at each batch size: time "
                        "per call, G multiply-adds/s, effective weight GB/s, and NumPy float32 matmul on the same "
                        "shape, with this machine's read bandwidth measured in the same run (every thread streaming "
                        "a buffer of 8x the last-level cache, at least 1 GiB, as decode reads its weights; and one "
                        "thread), the kernel path that ran and the CPU features that choose it.")
    k.add_argument("--shape", default="2b4t", choices=list(SHAPES), help="model shape (default: 2b4t)")
    k.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    k.add_argument("--batches", default="1,8,32,64", help="batch sizes (default: 1,8,32,64)")
    k.add_argument("--no-head", dest="head", action="store_false", help="skip the output head")
    k.add_argument("--json", help="also write the numbers to this JSON file")
    k.set_defaults(func=cmd_bench_kernels)

    m = bsub.add_parser("model", help="prefill, time to first token, decode and batched decode of a model",
                        description="Prefill tokens/s, time to first token, single-stream decode tokens/s (with "
                        "the bandwidth ceiling measured in the same run: bytes read per token / read bandwidth; a "
                        "decode above it is reported as a bandwidth measurement too low) and aggregate decode at "
                        "each concurrency under continuous batching, as the worker pool runs it; peak RSS; the "
                        "kernel path that ran and the CPU features that choose it.")
    add_model_source(m)
    m.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    m.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    m.add_argument("--gen", type=int, default=128, help="generated tokens per sequence (default: 128)")
    m.add_argument("--concurrency", default="1,8,32,64", help="concurrent sequences (default: 1,8,32,64)")
    add_model_options(m)
    add_kv_cache_option(m)
    m.add_argument("--json", help="also write the numbers to this JSON file")
    m.set_defaults(func=cmd_bench_model)

    h = bsub.add_parser("head", help="top-1 agreement and speed of the int8 output head against the bf16 one",
                        description="Runs random prompts through the model and compares, at every position, the "
                        "int8 head's top token with the exact bf16 head's, and times both heads; then generates "
                        "greedily from each prompt with either head and says where the tokens first differ.")
    add_model_source(h)
    h.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    h.add_argument("--prompts", type=int, default=8, help="random prompts (default: 8)")
    h.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (default: 128)")
    h.add_argument("--gen", type=int, default=32, help="greedy tokens generated from each prompt with either head, "
                   "compared (default: 32; 0: skip)")
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

    bp = bsub.add_parser("pool", help="a job on the embedded cluster vs the engine alone, same prompts",
                         description="Run the same prompts through the engine in this process and through a "
                         "one-worker job on the embedded Ray cluster; print rows/s, tokens/s and their ratio.")
    bp.add_argument("--model", "-m", required=True, help="model directory")
    bp.add_argument("--rows", type=int, default=256, help="prompts (default: 256)")
    bp.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt (default: 32)")
    bp.add_argument("--slots", type=int, default=8, help="engine slots (default: 8)")
    bp.add_argument("--threads", type=int, help="Numba threads (default: all CPUs)")
    bp.add_argument("--shard-rows", type=int, default=32, help="rows per shard (default: 32)")
    bp.add_argument("--json", help="also write the numbers to this JSON file")
    bp.set_defaults(func=cmd_bench_pool)

    bc = bsub.add_parser("cluster", help="the same job on simulated Ray clusters of 1, 2, 4... nodes",
                         description="Start a real multi-node Ray cluster on this machine (ray.cluster_utils: one "
                         "raylet per node, each with --cpus-per-node CPUs) for each node count, run the same job "
                         "on it, and print throughput, speed-up over the first node count, the time workers "
                         "waited on the coordinator and the coordinator's time per shard. Then time the "
                         "coordinator alone on a synthetic job to estimate how many nodes it can keep busy. "
                         "Simulated nodes share this machine's cores: more nodes than cores cannot go faster.")
    add_model_source(bc)
    bc.add_argument("--nodes", default="1,2,4", help="node counts, comma-separated (default: 1,2,4)")
    bc.add_argument("--cpus-per-node", type=int, default=1, help="CPUs (and worker threads) per node (default: 1)")
    bc.add_argument("--streams", type=int, default=32, help="concurrent sequences per worker (default: 32)")
    bc.add_argument("--rows", type=int, help="prompts (default: 2 x streams x the largest node count)")
    bc.add_argument("--max-tokens", type=int, default=16, help="tokens generated per prompt (default: 16)")
    bc.add_argument("--shard-rows", type=int, default=16, help="rows per shard (default: 16)")
    bc.add_argument("--object-store-mb", type=int, default=128, help="object store per node, MB (default: 128)")
    bc.add_argument("--coordinator-shards", type=int, default=4000,
                    help="synthetic shards for the coordinator-alone timing; 0 skips it (default: 4000)")
    add_model_options(bc)
    bc.add_argument("--json", help="also write the numbers to this JSON file")
    bc.set_defaults(func=cmd_bench_cluster)

    bx = bsub.add_parser("prefix", help="the prefix cache and prefix-aware leasing: whole jobs, on against off",
                         description="Whole jobs on simulated Ray clusters (real driver, coordinator and workers), "
                         "the same prompts each time. shared: rows of one long instruction and a short tail, the "
                         "prefix cache on against off (job tokens/s: prompt + generated tokens / processing time). "
                         "distinct: rows with nothing in common, on against off (the cache's cost; 1.00 is none). "
                         "routing: several instructions in runs of one shard, interleaved; the share of prompt "
                         "tokens from the cache on --nodes nodes, with prefix-aware leasing and in queue order, "
                         "against one node. The cache-off runs compute every prompt whole: the default sizes take "
                         "about 50 minutes on 2 cores (2b4t).")
    add_model_source(bx)
    bx.add_argument("--threads", type=int, default=2, help="worker threads on one node; split among --nodes for "
                    "routing (default: 2)")
    bx.add_argument("--rows", type=int, default=256, help="rows of the shared and routing jobs (default: 256)")
    bx.add_argument("--instruction-words", type=int, default=600,
                    help="words of each instruction, about a token each (default: 600)")
    bx.add_argument("--tail-words", type=int, default=50, help="words of each row's own tail (default: 50)")
    bx.add_argument("--max-tokens", type=int, default=16, help="tokens generated per row (default: 16)")
    bx.add_argument("--shard-rows", type=int, default=16, help="rows per shard (default: 16)")
    bx.add_argument("--distinct-rows", type=int, default=64, help="rows of the distinct job (default: 64)")
    bx.add_argument("--instructions", type=int, default=4, help="instructions of the routing job (default: 4)")
    bx.add_argument("--nodes", type=int, default=2, help="simulated nodes of the routing job (default: 2)")
    bx.add_argument("--parts", default="shared,distinct,routing",
                    help="which jobs to run, comma-separated (default: shared,distinct,routing)")
    add_kv_cache_option(bx)
    add_model_options(bx)
    bx.add_argument("--json", help="also write the numbers to this JSON file")
    bx.set_defaults(func=cmd_bench_prefix)
