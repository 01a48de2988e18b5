"""Model timings for `ternpool bench model`: prefill, time to first token, single-stream decode and
aggregate decode under continuous batching at several concurrencies, and peak memory."""

from __future__ import annotations

import resource
import time

import numpy as np

from .engine import Engine
from .requests import Request, SamplingParams


def _prompts(engine: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    cfg = engine.config
    top = min(cfg.vocab_size, len(engine.tokenizer)) - 300  # ordinary tokens, not the special ones at the end
    return [[cfg.bos_token_id] + rng.integers(100, top, size=length - 1).tolist() for _ in range(n)]


def _run(engine: Engine, prompts: list[list[int]], gen: int) -> dict:
    steps: list[tuple[float, int]] = []
    last = [time.perf_counter()]

    def on_step(tokens: int) -> None:
        now = time.perf_counter()
        steps.append((now - last[0], tokens))
        last[0] = now

    reqs = [Request(i, prompt_token_ids=p, params=SamplingParams(max_tokens=gen)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    last[0] = t0
    results = list(engine.stream(reqs, on_step=on_step))
    wall = time.perf_counter() - t0
    n = len(prompts)
    # decode-only steps: at most one token per sequence, so no prefill chunk is in them
    decode = [(dt, k) for dt, k in steps if k <= n]
    decode_time = sum(dt for dt, _ in decode)
    decode_tokens = sum(k for _, k in decode)
    return {"wall_s": wall, "generated": sum(r.completion_tokens for r in results),
            "ttft_s": float(np.mean([r.time_to_first_token for r in results])),
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time else 0.0,
            "tokens_per_s": sum(r.completion_tokens for r in results) / wall, "steps": len(decode)}


def bench_model(model: str, threads: int | None = None, prompt_len: int = 128, gen: int = 128,
                concurrency=(1, 8, 32, 64), head: str = "bf16", weights_format: str | None = None,
                seed: int = 0) -> dict:
    from ternpool.kernels.config import ISA

    Engine.load(model, threads=threads, slots=1, max_context=8, weights_format=weights_format)  # convert once
    t0 = time.perf_counter()
    engine = Engine.load(model, threads=threads, slots=max(concurrency), max_context=prompt_len + gen + 1,
                         step_tokens=max(512, prompt_len), head=head, weights_format=weights_format)
    load_s = time.perf_counter() - t0
    w = engine.model.weights
    head_bytes = w.head_q.nbytes + w.head_scale.nbytes if head == "int8" else w.embed.nbytes
    per_token = w.linear_bytes + head_bytes  # read once per decode step (norms and KV cache aside)
    engine.stop_ids = frozenset()  # random models may sample an end token: always generate `gen` tokens
    _run(engine, _prompts(engine, 1, 8, seed), 2)  # warm up
    single = _run(engine, _prompts(engine, 1, prompt_len, seed + 1), gen)
    out = {"model": str(model), "threads": engine.threads, "head": head, "weights_format": w.weights_format,
           "isa": ISA, "bytes_per_token": per_token, "prompt_len": prompt_len, "gen": gen, "load_s": load_s, "prefill_tokens_per_s": prompt_len / single["ttft_s"], "ttft_s": single["ttft_s"],
           "decode_tokens_per_s": single["decode_tokens_per_s"], "concurrency": {}}
    for c in concurrency:
        r = _run(engine, _prompts(engine, c, prompt_len, seed + 10 + c), gen)
        out["concurrency"][c] = {"aggregate_decode_tokens_per_s": r["decode_tokens_per_s"],
                                 "tokens_per_s_incl_prefill": r["tokens_per_s"], "wall_s": r["wall_s"]}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out
