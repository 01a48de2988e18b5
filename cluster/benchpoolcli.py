"""`ternpool bench pool | cluster`: the worker pool's overhead and how throughput grows with nodes."""

from __future__ import annotations

from .benchcli import add_model_source, resolve_model
from .cliopts import add_model_options


def cmd_bench_pool(args) -> int:
    from .bench_pool import bench_pool, print_bench_pool

    print_bench_pool(bench_pool(args.model, rows=args.rows, max_tokens=args.max_tokens, slots=args.slots,
                                threads=args.threads, shard_rows=args.shard_rows, json_path=args.json))
    return 0


def cmd_bench_cluster(args) -> int:
    from .bench_cluster import bench_cluster, coordinator_capacity, print_legend, print_run

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
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0


def add_pool_bench_commands(bsub) -> None:
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
