"""Prefix caching in whole jobs: rows that share long instructions give the same output with the cache on
and off, through a worker killed mid-job and a cancelled-then-resumed run; the prefix-cache counts agree in
the summary, the manifest, status and the Prometheus file."""

from __future__ import annotations

import json
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.cluster.driver import PoolConfig, submit
from ternpool.engine import EngineConfig, SamplingParams
from ternpool.jobs import read_output, status
from ternpool.jobs.demo import WORDS

from faulty_worker import faulty  # tests/cluster/faulty_worker.py
from helpers import completed_shards, wait_until

pytestmark = pytest.mark.cluster

ROWS, SHARD_ROWS = 120, 10
OUTPUT_COLUMNS = ("generated_text", "finish_reason", "prompt_tokens", "completion_tokens", "error",
                  "generated_logprobs", "prompt_token_logprobs")


def _shared_prefix_prompts(path) -> None:
    """Rows of 4 long instructions, interleaved, each followed by a short row-specific tail; a mix of
    greedy and sampled rows, rows with logprobs and rows whose prompt is scored."""
    import random

    rng = random.Random(3)
    instructions = [" ".join(rng.choice(WORDS) for _ in range(120)) for _ in range(4)]
    prompts = [f"{instructions[i % 4]} item {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
               for i in range(ROWS)]
    pq.write_table(pa.table({
        "id": [f"r{i}" for i in range(ROWS)],
        "prompt": prompts,
        "temperature": pa.array([0.8 if i % 3 == 0 else None for i in range(ROWS)], pa.float64()),
        "seed": pa.array([i if i % 3 == 0 else None for i in range(ROWS)], pa.int64()),
        "top_logprobs": pa.array([2 if i % 5 == 0 else None for i in range(ROWS)], pa.int64()),
        "prompt_logprobs": pa.array([1 if i % 7 == 0 else None for i in range(ROWS)], pa.int64()),
    }), path, row_group_size=SHARD_ROWS)


def _job(src, model, out, prefix_cache: bool, **kw):
    return submit(str(src), model, str(out), sampling=SamplingParams(max_tokens=6), shard_rows=SHARD_ROWS,
                  pool=PoolConfig(engine=EngineConfig(slots=4, threads=1, prefix_cache=prefix_cache), metrics_port=0),
                  **kw)


def _rows(out) -> list[tuple]:
    table = read_output(str(out))
    assert table.column("row_index").to_pylist() == list(range(ROWS))
    return list(zip(*(table.column(c).to_pylist() for c in OUTPUT_COLUMNS)))


def _metric(out, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = (out / "_metrics.prom").read_text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """The job with the prefix cache off: what every cached run must write."""
    tmp = tmp_path_factory.mktemp("prefix")
    src = tmp / "prompts.parquet"
    _shared_prefix_prompts(src)
    out = tmp / "no-cache"
    summary = _job(src, tiny_model, out, prefix_cache=False).wait(timeout=600)
    assert summary.state == "finished" and summary.failed_rows == 0
    assert summary.cached_tokens == 0 and _metric(out, "ternpool_prefix_cache_hit_tokens_total") == 0
    return src, _rows(out)


def test_cached_job_writes_what_the_uncached_one_does_and_counts_its_hits(tmp_path, tiny_model, reference):
    src, want = reference
    out = tmp_path / "cache"
    summary = _job(src, tiny_model, out, prefix_cache=True).wait(timeout=600)
    assert summary.state == "finished"
    assert _rows(out) == want
    # most of every prompt is its instruction: after the first rows of each, the cache holds it
    assert summary.cached_tokens > 0.5 * summary.prompt_tokens, (summary.cached_tokens, summary.prompt_tokens)
    assert summary.cached_tokens == summary.cached_tokens_this_run == sum(
        w.cached_tokens for w in summary.per_worker.values())
    assert _metric(out, "ternpool_prefix_cache_hit_tokens_total") == summary.cached_tokens
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sum(v["cached_tokens"] for v in manifest["completed"].values()) == summary.cached_tokens
    st = status(str(out))
    assert (st["job_cached_tokens"], st["job_prompt_tokens"]) == (summary.cached_tokens, summary.prompt_tokens)


def test_a_worker_killed_mid_job_and_a_resumed_run_write_the_same_rows(tmp_path, tiny_model, reference):
    """The cache lives in a worker: a replacement starts empty, a requeued piece is computed again, and
    a resumed run's workers start empty; none of it may change a row."""
    import ray

    src, want = reference
    out = tmp_path / "killed"
    handle = _job(src, tiny_model, out, prefix_cache=True, worker_cls=faulty(step_delay=0.02))
    wait_until(lambda: handle.progress().rows_done >= 30, 300, "30 rows done")
    victim = next(iter(handle.workers.values()))
    os.kill(ray.get(victim.info.remote(), timeout=30)["pid"], signal.SIGKILL)
    summary = handle.wait(timeout=600)
    assert summary.state == "finished" and summary.worker_restarts >= 1
    assert _rows(out) == want

    out = tmp_path / "resumed"
    handle = _job(src, tiny_model, out, prefix_cache=True, worker_cls=faulty(step_delay=0.05))
    wait_until(lambda: completed_shards(out) >= 3, 300, "3 shards written")
    handle.cancel()
    first = handle.wait(timeout=300)
    assert first.state == "cancelled" and first.rows < ROWS
    second = _job(src, tiny_model, out, prefix_cache=True).wait(timeout=600)
    assert second.state == "finished" and second.resumed
    assert _rows(out) == want
    # the whole job's count adds the first run's shards to the second run's
    manifest = json.loads((out / "_manifest.json").read_text())
    assert second.cached_tokens == sum(v["cached_tokens"] for v in manifest["completed"].values())
    assert second.cached_tokens > second.cached_tokens_this_run > 0
