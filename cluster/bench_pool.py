"""`ternpool bench pool`: the worker pool's overhead, measured side by side with the engine alone.

The same prompts go once through `Engine.generate` in this process and once
through a batch job on the embedded Ray cluster (one worker, the same
threads and slots). Printed: rows/s and generated tokens/s of both, and
the job's time split into start-up (Ray, worker, model load) and
processing.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def bench_prompts(rows: int) -> list[str]:
    """Prompts of 1 to 24 words, the same for every run."""
    from ternpool.jobs.demo import WORDS

    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 24)) for i in range(rows)]


def bench_pool(model: str, rows: int = 256, max_tokens: int = 32, slots: int = 8, threads: int | None = None,
               shard_rows: int = 32, json_path: str | None = None) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ternpool.engine import Engine, Request, SamplingParams
    from ternpool.engine.options import EngineConfig
    from .driver import JobHandle, PoolConfig, prepare
    from ternpool.jobs import JobSpec

    prompts = bench_prompts(rows)
    engine = Engine.load(model, EngineConfig(threads=threads, slots=slots))
    engine.generate([Request(0, prompt="warm up", params=SamplingParams(max_tokens=2))])
    t0 = time.perf_counter()
    direct = engine.generate([Request(i, prompt=p, params=SamplingParams(max_tokens=max_tokens))
                              for i, p in enumerate(prompts)])
    engine_s = time.perf_counter() - t0
    engine_tokens = sum(r.completion_tokens for r in direct)
    threads = engine.threads
    del engine

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"prompt": prompts}), src)
        plan = prepare(JobSpec(inputs=str(src), output=str(Path(tmp) / "out"), model=model,
                               sampling=SamplingParams(max_tokens=max_tokens), shard_rows=shard_rows))
        t0 = time.perf_counter()
        handle = JobHandle(plan, PoolConfig(workers=1, engine=EngineConfig(threads=threads, slots=slots)))
        summary = handle.wait()
        job_s = time.perf_counter() - t0
    result = {
        "rows": rows, "max_tokens": max_tokens, "slots": slots, "threads": threads,
        "engine": {"seconds": engine_s, "rows_per_s": rows / engine_s, "tokens_per_s": engine_tokens / engine_s},
        "job": {"seconds": job_s, "rows_per_s": rows / job_s, "tokens_per_s": summary.generated_tokens / job_s,
                "processing_seconds": summary.processing_s,
                "processing_tokens_per_s": summary.generated_tokens / summary.processing_s},
        "same_tokens": summary.generated_tokens == engine_tokens,
    }
    result["job_vs_engine_total"] = result["job"]["tokens_per_s"] / result["engine"]["tokens_per_s"]
    result["job_vs_engine_processing"] = (result["job"]["processing_tokens_per_s"]
                                          / result["engine"]["tokens_per_s"])
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def print_bench_pool(r: dict) -> None:
    e, j = r["engine"], r["job"]
    print(f"{r['rows']} prompts x {r['max_tokens']} tokens, {r['slots']} slots, {r['threads']} threads")
    print(f"{'':28}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}")
    print(f"{'engine alone':28}{e['seconds']:9.2f}{e['rows_per_s']:9.1f}{e['tokens_per_s']:10.1f}")
    print(f"{'job, processing':28}{j['processing_seconds']:9.2f}{r['rows'] / j['processing_seconds']:9.1f}"
          f"{j['processing_tokens_per_s']:10.1f}")
    print(f"{'job, total (incl. start-up)':28}{j['seconds']:9.2f}{j['rows_per_s']:9.1f}{j['tokens_per_s']:10.1f}")
    print(f"job / engine tokens/s: {r['job_vs_engine_processing']:.2f} while processing, "
          f"{r['job_vs_engine_total']:.2f} including start-up; same generated tokens: {r['same_tokens']}")
