"""Cost of a job: the arithmetic of core-seconds and dollars per million tokens, the figures a job run
through the coordinator reports (summary, status, _progress.json, _manifest.json, metrics) against its
own CPU seconds, processing time and token counts, and the dry run's calibrated estimate."""

from __future__ import annotations

import json

import pytest

from ternpool.cluster.coordinator import DONE, Coordinator
from ternpool.cluster.cost import CostEstimate, JobCost
from ternpool.engine.requests import Result
from ternpool.jobs import Manifest

from helpers import make_job

pytestmark = pytest.mark.unit


def test_cost_arithmetic():
    c = JobCost(core_s=360.0, node_s=7200.0, prompt_tokens=2_000_000, generated_tokens=500_000, node_price=0.5)
    assert c.core_s_per_m_prompt_tokens == 180.0 and c.core_s_per_m_generated_tokens == 720.0
    assert c.dollars == 1.0  # two node-hours at $0.50
    assert c.dollars_per_m_prompt_tokens == 0.5 and c.dollars_per_m_generated_tokens == 2.0
    d = c.to_dict()
    assert d["dollars"] == 1.0 and d["core_s_per_m_generated_tokens"] == 720.0 and d["node_price"] == 0.5
    assert "720 core-s per million generated tokens" in c.line() and "$2.0000 per million generated" in c.line()
    free = JobCost(10.0, 20.0, 0, 100)
    assert free.dollars is None and free.dollars_per_m_generated_tokens is None
    assert free.core_s_per_m_prompt_tokens is None and free.core_s_per_m_generated_tokens == 100_000.0
    assert "$" not in free.line() and "n/a per million prompt" in free.line()


def test_estimate_arithmetic():
    e = CostEstimate(rows=100, prompt_tokens=36_000, generated_tokens=72_000, prefill_tokens_per_s=100.0,
                     decode_tokens_per_s=20.0, nodes=2, node_price=1.5)
    assert e.hours == pytest.approx((360 + 3600) / 2 / 3600)  # each node does half
    assert e.dollars == pytest.approx(e.hours * 2 * 1.5)
    assert "on 2 node(s) about 0.550 hours" in e.line() and "$1.65 at $1.5 a node-hour" in e.line()
    cached = CostEstimate(100, 36_000, 72_000, 100.0, 20.0, 2, cached_tokens=30_000)
    assert cached.hours == pytest.approx((60 + 3600) / 2 / 3600)  # the prefix cache's tokens are not prefilled
    assert "~36,000 prompt (~30,000 of them from the prefix cache)" in cached.line()


def test_shared_prefix_tokens_match_the_engine_rule():
    from ternpool.cluster.calibrate import shared_prefix_tokens

    head = list(range(100, 140))  # 40 tokens: 2 full blocks of 16
    assert shared_prefix_tokens([head + [1], head + [2], head + [3, 4]]) == 2 * 32  # the first computes it
    assert shared_prefix_tokens([head, head]) == 32  # 40 tokens again: 2 blocks, the last token computed anyway
    assert shared_prefix_tokens([head[:32], head[:32]]) == 16  # exactly 2 blocks: the second holds the last token
    assert shared_prefix_tokens([[7] + head, head]) == 0  # not a prefix


def _run_job(tmp_path, node_price):
    spec, inputs, plan = make_job(tmp_path, 12, src=tmp_path / "p.parquet", shard_rows=4)
    coord = Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, {"m": 1}), 2,
                        node_price=node_price)
    nodes = {"w1": "node-a", "w2": "node-b", "w3": "node-b"}
    for worker, node in nodes.items():
        coord.register(worker, node)
    cpu = {w: 0.0 for w in nodes}
    turn = 0
    while True:
        worker = list(nodes)[turn % 3]
        turn += 1
        lease = coord.lease(worker)
        if lease == DONE:
            break
        key, table = lease
        results = [Result(i, "t", (1, 2, 3), 5, 3, "length") for i in table.column("row_index").to_pylist()]
        cpu[worker] += 2.5
        coord.heartbeat(worker, 1, None, cpu[worker] - 1.0)
        assert coord.complete(worker, key, results, None, cpu[worker])
    coord.heartbeat("w1", 0, None, 0.5)  # running totals never go back
    return coord, sum(cpu.values())


def test_a_jobs_cost_figures_agree_with_its_cpu_time_tokens_and_processing_time(tmp_path, capsys):
    from ternpool.cluster.cli.jobs import cmd_status, print_summary
    from ternpool.cluster.stats import summarize
    from ternpool.jobs import status

    coord, core_s = _run_job(tmp_path, node_price=0.9)
    stats = coord.write_progress("finished")
    cost = stats.cost
    assert (cost.prompt_tokens, cost.generated_tokens) == (60, 36) and cost.core_s == core_s == 7.5
    assert cost.node_s == pytest.approx(2 * stats.processing_s) and stats.processing_s > 0  # two nodes
    assert cost.core_s_per_m_generated_tokens == pytest.approx(7.5 / 36 * 1e6)
    assert cost.core_s_per_m_prompt_tokens == pytest.approx(7.5 / 60 * 1e6)
    assert cost.dollars == pytest.approx(2 * stats.processing_s / 3600 * 0.9)
    assert cost.dollars_per_m_generated_tokens == pytest.approx(cost.dollars / 36 * 1e6)

    out = tmp_path / "out"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["cost"] == pytest.approx(cost.to_dict())
    assert json.loads((out / "_progress.json").read_text())["cost"] == pytest.approx(cost.to_dict())
    assert status(str(out))["cost"] == pytest.approx(cost.to_dict())

    text = coord.metrics.exposition().decode()
    values = {ln.split("{")[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("ternpool_")
              and "{" in ln and "worker_cpu" not in ln}
    assert values["ternpool_core_seconds_per_million_generated_tokens"] == pytest.approx(
        cost.core_s_per_m_generated_tokens)
    assert values["ternpool_core_seconds_per_million_prompt_tokens"] == pytest.approx(cost.core_s_per_m_prompt_tokens)
    assert values["ternpool_dollars_per_million_generated_tokens"] == pytest.approx(
        cost.dollars_per_m_generated_tokens, rel=1e-3)  # set at the last stats(), a moment earlier
    cpu = [float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("ternpool_worker_cpu_seconds_total{")]
    assert sorted(cpu) == [2.5, 2.5, 2.5]

    summary = summarize(str(out), stats.job_id, "finished", stats, wall_s=5.0)
    print_summary(summary)
    printed = capsys.readouterr().out
    assert cost.line() in printed and "at $0.9 a node-hour" in printed

    class Args:
        output, json = str(out), False
    assert cmd_status(Args) == 0
    assert "cost: 7.5 core-seconds; 208,333 core-s per million generated tokens" in capsys.readouterr().out


def test_without_a_node_price_there_are_no_dollars(tmp_path):
    coord, _ = _run_job(tmp_path, node_price=None)
    cost = coord.write_progress("finished").cost
    assert cost.dollars is None and cost.core_s_per_m_generated_tokens > 0
    assert "ternpool_dollars_per_million_generated_tokens{" not in coord.metrics.exposition().decode()


def test_the_dry_run_estimate_is_calibrated_on_the_model(tmp_path, tiny_model):
    from ternpool.cluster.calibrate import estimate
    from ternpool.cluster.plan import PoolConfig, prepare
    from ternpool.engine.tokenizer import Tokenizer

    from dataclasses import replace

    spec, _, _ = make_job(tmp_path, 10)
    spec = replace(spec, model=tiny_model)
    plan = prepare(spec)
    est = estimate(plan, PoolConfig(node_price=2.0), slots=2, nodes=3)
    tok = Tokenizer(tiny_model)
    assert est.rows == 10 and est.prompt_tokens == sum(len(tok.encode(f"p{i}")) for i in range(10))
    assert est.generated_tokens == 10 * spec.sampling.max_tokens
    assert est.prefill_tokens_per_s > 0 and est.decode_tokens_per_s > 0 and est.nodes == 3
    assert est.dollars == pytest.approx(est.hours * 3 * 2.0) and est.hours > 0
