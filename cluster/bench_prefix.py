"""`ternpool bench prefix`: what the prefix cache and prefix-aware leasing buy a whole job, measured side by
side in one run.

Every job runs through the real driver, coordinator and workers on a fresh simulated Ray cluster
(`bench_cluster.run_on_cluster`), with the same prompts each time:

1. shared: `--rows` rows of one long instruction (`--instruction-words`) and a short row-specific tail
   (`--tail-words`), on one node: the prefix cache on against off; job tokens/s (prompt + generated
   tokens / processing time) and the ratio.
2. distinct: rows of as many words with nothing in common, on one node, on against off: the cache's cost
   when there is nothing to share (its ratio should be 1 within noise).
3. routing: `--instructions` instructions whose rows come in runs of one shard each, interleaved; on one
   node, then on `--nodes` nodes with prefix-aware leasing and without: the share of prompt tokens taken
   from the cache, against the one-node figure.

Words are drawn from `ternpool demo`'s list, about one token each with Llama-3's tokenizer; the measured
prompt tokens per row are printed.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

from ternpool.engine.options import EngineConfig


def _words(rng: random.Random, n: int) -> str:
    from ternpool.jobs.demo import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(n))


def _write(path: Path, prompts: list[str], shard_rows: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=shard_rows)
    return str(path)


def bench_prefix(model: str, rows: int = 256, instruction_words: int = 600, tail_words: int = 50,
                 max_tokens: int = 16, threads: int = 2, shard_rows: int = 16, distinct_rows: int = 64,
                 instructions: int = 4, nodes: int = 2, parts: tuple[str, ...] = ("shared", "distinct", "routing"),
                 engine: EngineConfig | None = None, json_path: str | None = None, on_line=print) -> dict:
    from ternpool.engine.native import ensure_native

    from .bench_cluster import run_on_cluster

    engine = engine or EngineConfig()
    ensure_native(model, engine.weights_format)  # convert once here, not in every job's workers
    rng = random.Random(0)
    result: dict = {"model": model, "rows": rows, "instruction_words": instruction_words, "tail_words": tail_words,
                    "max_tokens": max_tokens, "threads": threads, "shard_rows": shard_rows}

    def job(name: str, src: str, n: int, cpus: int, cache: bool, **pool) -> dict:
        summary, _ = run_on_cluster(n, cpus, src, model, str(Path(tmp) / name), replace(
            engine, threads=cpus, prefix_cache=cache), max_tokens, shard_rows, **pool)
        tokens = summary.prompt_tokens + summary.generated_tokens
        r = {"rows": summary.rows, "prompt_tokens": summary.prompt_tokens, "cached_tokens": summary.cached_tokens,
             "generated_tokens": summary.generated_tokens, "processing_s": summary.processing_s,
             "tokens_per_s": tokens / summary.processing_s,
             "hit_rate": summary.cached_tokens / summary.prompt_tokens if summary.prompt_tokens else 0.0,
             "workers": {w: v.cached_tokens / v.prompt_tokens for w, v in summary.per_worker.items() if v.prompt_tokens}}
        on_line(f"  {name:<28} {summary.rows} rows, {summary.prompt_tokens / summary.rows:.0f} prompt tokens a row, "
                f"{r['processing_s']:7.1f} s, {r['tokens_per_s']:8.1f} tokens/s, "
                f"{100 * r['hit_rate']:5.1f}% of prompt tokens from the cache")
        return r

    def on_off(name: str, src: str) -> None:
        """The job on one node with the cache on, then off, and the ratio of their tokens/s, into `result`."""
        on, off = job(f"{name}-cache-on", src, 1, threads, True), job(f"{name}-cache-off", src, 1, threads, False)
        result[name] = {"on": on, "off": off, "ratio": on["tokens_per_s"] / off["tokens_per_s"]}
        on_line(f"  prefix cache on / off: {result[name]['ratio']:.2f}x job tokens/s")

    with tempfile.TemporaryDirectory() as tmp:
        if "shared" in parts:
            on_line(f"shared: {rows} rows of one {instruction_words}-word instruction + a {tail_words}-word tail, "
                    f"1 node, {threads} threads")
            head = _words(rng, instruction_words)
            src = _write(Path(tmp) / "shared.parquet",
                         [f"{head}\n\nRow {i}: {_words(rng, tail_words)}" for i in range(rows)], shard_rows)
            on_off("shared", src)
        if "distinct" in parts:
            on_line(f"distinct: {distinct_rows} rows of {instruction_words + tail_words} words with nothing shared, "
                    f"1 node, {threads} threads")
            src = _write(Path(tmp) / "distinct.parquet",
                         [_words(rng, instruction_words + tail_words) for _ in range(distinct_rows)], shard_rows)
            on_off("distinct", src)
        if "routing" in parts:
            cpus = max(1, threads // nodes)
            on_line(f"routing: {rows} rows of {instructions} instructions in runs of {shard_rows} rows, interleaved; "
                    f"1 node of {threads} threads, then {nodes} nodes of {cpus}")
            heads = [_words(rng, instruction_words) for _ in range(instructions)]
            src = _write(Path(tmp) / "routing.parquet",
                         [f"{heads[i // shard_rows % instructions]}\n\nRow {i}: {_words(rng, tail_words)}"
                          for i in range(rows)], shard_rows)
            one = job("routing-1-node", src, 1, threads, True)
            aware = job(f"routing-{nodes}-nodes-affinity", src, nodes, cpus, True, prefix_affinity=True)
            blind = job(f"routing-{nodes}-nodes-queue-order", src, nodes, cpus, True, prefix_affinity=False)
            result["routing"] = {"one_node": one, "affinity": aware, "queue_order": blind,
                                 "affinity_vs_one_node": aware["hit_rate"] / one["hit_rate"],
                                 "queue_order_vs_one_node": blind["hit_rate"] / one["hit_rate"]}
            on_line(f"  hit rate on {nodes} nodes / 1 node: {result['routing']['affinity_vs_one_node']:.3f} with "
                    f"prefix-aware leasing, {result['routing']['queue_order_vs_one_node']:.3f} in queue order")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
