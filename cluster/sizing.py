"""Sizing a job against the nodes of a Ray cluster: what one worker holds (weights, KV cache of its
slots, runtime) and whether it fits each node. `submit` refuses a job unless every node fits;
`--dry-run` prints the verdicts."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from ternpool.engine.engine import auto_slots, context_length
from ternpool.engine.footprint import Footprint, fit_problem, footprint
from ternpool.engine.native import resolved_weights_format
from ternpool.engine.shapes import kv_bytes_per_slot
from ternpool.jobs.errors import JobInputError

from .plan import Plan, PoolConfig
from .ray_env import connect


@dataclass(frozen=True)
class NodeFit:
    """Whether one worker of a job fits one node, in the memory Ray gives that node's workers."""

    node_id: str
    address: str
    memory: int  # bytes for workers (Ray's `memory` resource: the object store is already taken out)
    object_store: int
    slots: int  # the configured slots, or what automatic slots would pick with this memory
    footprint: Footprint  # one worker with `slots` slots
    problem: str | None  # None when it fits; else what it needs and what would fit

    @property
    def fits(self) -> bool:
        return self.problem is None

    def verdict(self) -> str:
        if self.fits:
            return f"fits: {self.footprint.total / 1e9:.2f} GB of {self.memory / 1e9:.1f} GB"
        return f"does not fit: {self.problem}"


@dataclass(frozen=True)
class JobSizing:
    """What one worker of a job holds, and the verdict for every node (`size_job`)."""

    model_dir: str
    max_context: int
    weights_format: str
    head: str
    kv_cache: str
    slots: int | None  # as configured; None: automatic (per node, see NodeFit.slots)
    nodes: tuple[NodeFit, ...]

    @property
    def fits(self) -> bool:
        return all(n.fits for n in self.nodes)

    def check(self) -> None:
        """JobInputError naming every node that one worker does not fit, and what would fit."""
        unfit = [n for n in self.nodes if not n.fits]
        if unfit:
            raise JobInputError("; ".join(f"model {self.model_dir} does not fit node {n.node_id[:12]} ({n.address}): "
                                          f"{n.problem}" for n in unfit))


def size_job(plan: Plan, pool: PoolConfig, nodes: list[dict] | None = None) -> JobSizing:
    """Size one worker of the job (context, slots, weights format, footprint) and judge it against every
    alive node with a CPU (`nodes`: `ray.nodes()` entries; default: this Ray cluster's): weights, the KV
    cache of the configured slots (automatic slots: as many as the engine would pick, fewer when only
    fewer fit, at least one) and the runtime, against what Ray gives the node for workers. `submit`
    refuses the job unless every node fits (`JobSizing.check`); `--dry-run` prints the verdicts.
    JobInputError when --max-context exceeds the model's limit."""
    cfg, engine = plan.config, pool.engine
    fmt = resolved_weights_format(plan.model_dir, engine.weights_format)
    try:
        ctx = context_length(cfg, engine.max_context)
    except ValueError as e:
        raise JobInputError(f"model {plan.model_dir}: {e}") from None
    fits = []
    for node in ray.nodes() if nodes is None else nodes:
        res = node.get("Resources", {})
        if not node.get("Alive") or res.get("CPU", 0) < 1 or "memory" not in res:
            continue
        memory, store = int(res["memory"]), int(res.get("object_store_memory", 0))
        slots = engine.slots
        if slots is None:
            fixed = footprint(cfg, fmt, engine.head, 0, ctx)
            room = (memory - fixed.total) // kv_bytes_per_slot(cfg, ctx, engine.kv_cache)
            slots = max(1, min(auto_slots(cfg, ctx, memory, engine.kv_cache), room))
        fits.append(NodeFit(node["NodeID"], node.get("NodeManagerAddress", "?"), memory, store, slots,
                            footprint(cfg, fmt, engine.head, slots, ctx, engine.kv_cache),
                            fit_problem(cfg, fmt, engine.head, slots, ctx, memory, store, engine.kv_cache)))
    return JobSizing(plan.model_dir, ctx, fmt, engine.head, engine.kv_cache, engine.slots, tuple(fits))


def size_on_cluster(plan: Plan, pool: PoolConfig) -> JobSizing:
    """`size_job` against the nodes of the cluster `submit` would use (what `--dry-run` prints): joins
    or starts it as `submit` does, and stops a cluster it started."""
    owns_ray = connect(pool.address, pool.object_store_memory)
    try:
        return size_job(plan, pool)
    finally:
        if owns_ray:
            ray.shutdown()


def check_memory(plan: Plan, pool: PoolConfig) -> JobSizing:
    """Refuse, before any compute, a job one worker of which does not fit some node (see `size_job`)."""
    sizing = size_job(plan, pool)
    sizing.check()
    return sizing
