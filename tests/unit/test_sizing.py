"""Sizing a job against every node (`cluster/sizing.py`, `size_job`): the check submit refuses a job with and the
verdicts `--dry-run` prints; a --max-context beyond the model's limit is an error, not a silent cap."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.cluster.driver import PoolConfig, prepare
from ternpool.cluster.sizing import size_job
from ternpool.cluster.cli.jobs import _print_plan
from ternpool.engine import Engine
from ternpool.engine.footprint import footprint
from ternpool.engine.options import DEFAULT_HEAD, DEFAULT_SLOTS, EngineConfig
from ternpool.engine.shapes import kv_bytes_per_slot
from ternpool.jobs import JobInputError, JobSpec

pytestmark = pytest.mark.unit


def _node(node_id: str, memory: int, cpus: float = 2.0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "NodeManagerAddress": f"10.0.0.{node_id[-1]}", "Alive": alive,
            "Resources": {"CPU": cpus, "memory": float(memory), "object_store_memory": 1e8}}


@pytest.fixture
def plan(tmp_path, tiny_model):
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), src)
    return prepare(JobSpec(str(src), str(tmp_path / "out"), tiny_model))


def test_every_node_gets_a_verdict(plan, capsys):
    cfg = plan.config
    one_slot = footprint(cfg, "2bit", DEFAULT_HEAD, 1, 2048)
    big, small = 22_100_000_000, one_slot.total + kv_bytes_per_slot(cfg, 2048) // 2  # small: 1 slot, not 2
    nodes = [_node("aaaaaaaaaaaaaaaa1", big), _node("bbbbbbbbbbbbbbbb2", small),
             _node("cccccccccccccccc3", big, cpus=0), _node("dddddddddddddddd4", big, alive=False)]
    sizing = size_job(plan, PoolConfig(engine=EngineConfig(slots=2)), nodes)
    assert (sizing.max_context, sizing.weights_format, sizing.head, sizing.slots) == (2048, "2bit", DEFAULT_HEAD, 2)
    assert [n.node_id for n in sizing.nodes] == ["aaaaaaaaaaaaaaaa1", "bbbbbbbbbbbbbbbb2"]  # CPU nodes alive
    fit, unfit = sizing.nodes
    two_slots = footprint(cfg, "2bit", DEFAULT_HEAD, 2, 2048)
    assert fit.fits and fit.footprint == two_slots
    assert fit.verdict() == f"fits: {two_slots.total / 1e9:.2f} GB of 22.1 GB"
    assert not unfit.fits and not sizing.fits
    assert unfit.verdict().startswith("does not fit: one worker needs") and "Would fit: --slots 1" in unfit.verdict()
    with pytest.raises(JobInputError, match=r"does not fit node bbbbbbbbbbbb \(10.0.0.2\): .*Would fit: --slots 1"):
        sizing.check()
    _print_plan(plan, PoolConfig(engine=EngineConfig(slots=2)), sizing)
    out = capsys.readouterr().out
    assert f"node aaaaaaaaaaaa (10.0.0.1): fits: {two_slots.total / 1e9:.2f} GB of 22.1 GB (weights" in out
    assert "node bbbbbbbbbbbb (10.0.0.2): does not fit: one worker needs" in out
    # automatic slots shrink to what fits the node, so the same small node fits
    auto = size_job(plan, PoolConfig(), nodes[:2])
    assert auto.fits and [n.slots for n in auto.nodes] == [DEFAULT_SLOTS, 1]
    # a bf16 KV cache: half the bytes a slot, so the small node (room for 1.5 f32 slots) holds 3 (and 2 fixed
    # slots fit it)
    half = size_job(plan, PoolConfig(engine=EngineConfig(kv_cache="bf16")), nodes[:2])
    assert half.kv_cache == "bf16" and [n.slots for n in half.nodes] == [DEFAULT_SLOTS, 3]
    assert half.nodes[1].footprint == footprint(cfg, "2bit", DEFAULT_HEAD, 3, 2048, "bf16")
    assert size_job(plan, PoolConfig(engine=EngineConfig(slots=2, kv_cache="bf16")), nodes[:2]).fits
    _print_plan(plan, PoolConfig(engine=EngineConfig(kv_cache="bf16")), half)
    assert f"2bit weights, {DEFAULT_HEAD} head, bf16 KV cache, context 2048 tokens" in capsys.readouterr().out
    # an int8 KV cache: the values and a scale a row (16 + 4 bytes against float32's 64 on this model with
    # head_dim 16: 3.2x; 3.9x at 2b4t's 128, test_footprint), so the small node holds 4
    quarter = size_job(plan, PoolConfig(engine=EngineConfig(kv_cache="int8")), nodes[:2])
    per_slot = kv_bytes_per_slot(cfg, 2048, "int8")
    assert 4 * per_slot < 1.5 * kv_bytes_per_slot(cfg, 2048) < 5 * per_slot and cfg.head_dim == 16
    assert quarter.kv_cache == "int8" and [n.slots for n in quarter.nodes] == [DEFAULT_SLOTS, 4] and quarter.fits
    assert quarter.nodes[1].footprint == footprint(cfg, "2bit", DEFAULT_HEAD, 4, 2048, "int8")
    _print_plan(plan, PoolConfig(engine=EngineConfig(kv_cache="int8")), quarter)
    out = capsys.readouterr().out
    assert f"2bit weights, {DEFAULT_HEAD} head, int8 KV cache, context 2048 tokens" in out
    assert f"KV cache {4 * per_slot / 1e9:.2f} GB for 4 slots" in out


def test_max_context_above_the_model_limit_is_an_error(plan, tiny_model):
    limit = plan.config.max_position_embeddings
    message = f"max context {limit + 1} (--max-context / max_context=) is larger than the model's " \
              f"max_position_embeddings {limit}"
    with pytest.raises(JobInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        size_job(plan, PoolConfig(engine=EngineConfig(max_context=limit + 1)), [])
    assert size_job(plan, PoolConfig(engine=EngineConfig(max_context=limit)), []).max_context == limit
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine.load(tiny_model, slots=1, max_context=limit + 1)
