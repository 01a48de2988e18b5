"""What a job is before it runs: the pool it runs on (`PoolConfig`) and its plan (`prepare`: every
check that needs no cluster, and the shards still to do). Writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ternpool.engine import ModelConfig
from ternpool.engine.hub import resolve_model_dir
from ternpool.engine.options import EngineConfig
from ternpool.engine.validate import validate_model
from ternpool.jobs import JobSpec, Manifest, model_fingerprint, open_inputs, plan_shards


@dataclass(frozen=True)
class PoolConfig:
    """The worker pool of a job: where, how many workers, and the engine each one runs.
    `engine.threads` None: all CPUs of the node; `engine.slots` None: DEFAULT_SLOTS, fewer if the KV cache
    would not fit the node's memory; `engine.truncate` is the job's (`JobSpec.truncate`)."""

    address: str | None = None  # None: embedded local cluster (or the one this process already joined)
    workers: int | None = None  # None: one per node
    engine: EngineConfig = field(default_factory=EngineConfig)
    hang_timeout: float = 300.0  # seconds without progress before a worker is declared hung
    max_worker_restarts: int = 20
    object_store_memory: int | None = None
    metrics_host: str = "127.0.0.1"  # where the coordinator serves Prometheus metrics
    metrics_port: int | None = None  # None: 9469, or a free port when that is taken; 0: a free port; -1: none
    pushgateway: str | None = None  # push the final metrics there
    node_price: float | None = None  # dollars per node-hour: adds dollar figures to the job's cost
    prefix_affinity: bool = True  # lease workers the shards whose prompts start like theirs (cluster/affinity.py)


@dataclass(frozen=True)
class Plan:
    spec: JobSpec
    inputs: object
    shards: list
    manifest: Manifest
    model_dir: str
    config: ModelConfig

    @property
    def todo(self) -> list:
        return [s for s in self.shards if not self.manifest.is_done(s.shard_id)]


def prepare(spec: JobSpec) -> Plan:
    """All checks before compute that need no cluster: inputs, model, that ternpool may write OUT
    and, when OUT holds a manifest, that it is this job (then the plan resumes it). Writes nothing:
    `JobHandle` creates or claims OUT once every check has passed."""
    inputs = open_inputs(spec.inputs, spec.input_format)
    model_dir = str(resolve_model_dir(spec.model))
    cfg = validate_model(model_dir)  # config, tensor headers, tokenizer and chat template: before any worker
    shards = plan_shards(inputs, spec.shard_rows)
    manifest = Manifest.for_job(spec.output, spec, inputs, shards, model_fingerprint(model_dir))
    return Plan(spec, inputs, shards, manifest, model_dir, cfg)


def worker_engine(spec: JobSpec, engine: EngineConfig) -> EngineConfig:
    """The engine options of a job's workers: the pool's, with the job's truncate (it decides rows'
    results, so it is part of the job's identity: `JobSpec.truncate`). ValueError when the pool
    asks for another truncate than the job's default."""
    if engine.truncate not in (spec.truncate, EngineConfig.truncate):
        raise ValueError(f"PoolConfig.engine.truncate is {engine.truncate!r} but the job's is {spec.truncate!r}: "
                         f"truncate is a job option (submit(..., truncate={engine.truncate!r}))")
    return replace(engine, truncate=spec.truncate)
