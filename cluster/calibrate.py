"""The dry run's cost estimate: a short measured calibration of the job's model with the job's engine
settings on this node (a prefill of a prompt as long as the job's average and a few decode steps of
every slot), applied to the job's token counts (prompt tokens from a sample of its rows, less those
the prefix cache would give; generated tokens at most max_tokens a row)."""

from __future__ import annotations

import logging
from dataclasses import replace

from ternpool.engine import Engine
from ternpool.engine.bench import random_prompts, timed_run, warm_up
from ternpool.engine.blocks import prefix_hashes
from ternpool.engine.options import KV_BLOCK_TOKENS
from ternpool.jobs.rows import read_shard, to_requests

from .cost import CostEstimate
from .plan import Plan, PoolConfig, worker_engine

log = logging.getLogger(__name__)

SAMPLE_ROWS = 64  # rows tokenized to estimate the job's prompt tokens
DECODE_STEPS = 8  # decode steps of every slot measured


def job_tokens(plan: Plan, engine: Engine) -> tuple[int, int, int, int]:
    """(rows, prompt tokens, generated tokens at most, prompt tokens from the prefix cache) of the
    shards still to run: prompt tokens are the mean of the first SAMPLE_ROWS rows' times the rows;
    generated ones the same with max_tokens; cached ones the share of the sample's prompt tokens that
    an earlier sample row's prompt would give from the cache (0 with the cache off)."""
    todo = plan.todo
    rows = sum(s.num_rows for s in todo)
    sample = []
    for shard in todo:
        sample += [rr.request for rr in to_requests(read_shard(plan.inputs, shard), plan.spec,
                                                      plan.inputs.text_column) if rr.request is not None]
        if len(sample) >= SAMPLE_ROWS:
            break
    sample = sample[:SAMPLE_ROWS]
    if not sample:
        return rows, 0, 0, 0
    ids = [engine.tokenizer.encode(r.prompt) if r.prompt is not None else engine.tokenizer.encode_chat(r.messages)
           for r in sample]
    prompt = sum(map(len, ids))
    cached = shared_prefix_tokens(ids) if engine.blocks.caching else 0
    return (rows, round(prompt / len(sample) * rows),
            round(sum(r.params.max_tokens for r in sample) / len(sample) * rows),
            round(cached / len(sample) * rows))


def shared_prefix_tokens(prompts: list[list[int]]) -> int:
    """Tokens of these prompts, in order, that the prefix cache would give: each prompt's leading full
    blocks that an earlier one named (the last token always computed), as the engine matches them."""
    seen: set[bytes] = set()
    cached = 0
    for ids in prompts:
        names = prefix_hashes(ids, KV_BLOCK_TOKENS)
        hit = next((i for i, name in enumerate(names) if name not in seen), len(names))
        cached += min(hit, (len(ids) - 1) // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
        seen.update(names)
    return cached


def estimate(plan: Plan, pool: PoolConfig, slots: int, nodes: int) -> CostEstimate:
    """Load the model here with the workers' engine settings and `slots` slots, measure prefill and
    decode, and estimate the job on `nodes` nodes at PoolConfig.node_price."""
    engine = Engine.load(plan.model_dir, replace(worker_engine(plan.spec, pool.engine), slots=slots))
    rows, prompt_tokens, generated_tokens, cached_tokens = job_tokens(plan, engine)
    length = max(2, min(prompt_tokens // max(rows, 1), engine.model.max_context - DECODE_STEPS - 1))
    warm_up(engine, length)
    prefill = timed_run(engine, random_prompts(engine, 1, length, seed=1), 1)
    decode = timed_run(engine, random_prompts(engine, slots, min(length, 16), seed=2), DECODE_STEPS)
    est = CostEstimate(rows, prompt_tokens, generated_tokens, length / prefill["ttft_s"],
                       decode["decode_tokens_per_s"] or decode["tokens_per_s"], nodes, pool.node_price,
                       cached_tokens)
    log.info("calibration: prefill of %d tokens in %.3f s, decode of %d slots at %.1f tokens/s", length,
             prefill["ttft_s"], slots, est.decode_tokens_per_s)
    return est
