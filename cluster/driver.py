"""Submitting a batch job: validate, plan, start the coordinator and one worker per node, supervise.

Everything that can be checked is checked before any compute: the input
schema, the model, and (when OUT already has a manifest) that the job is the
same one, so that rerunning the same command resumes it. Supervision runs
in a background thread of the submitting process: it replaces workers that
die, kills workers that stop making progress (their work is requeued), starts
workers on nodes that join, and watches `OUT/_cancel`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ternpool.engine import ModelConfig
from ternpool.engine.engine import auto_slots, context_length
from ternpool.engine.footprint import Footprint, fit_problem, footprint, kv_bytes_per_slot
from ternpool.engine.hub import resolve_model_dir
from ternpool.engine.native import resolved_weights_format
from ternpool.engine.validate import validate_model
from ternpool.jobs import JobSpec, Manifest, model_fingerprint, open_inputs, plan_shards
from ternpool.jobs.errors import JobInputError
from ternpool.jobs.progress import (cancel_requested, claim_output, clear_cancel, read_progress, request_cancel,
                                    write_progress)
from ternpool.jobs.runlock import OutputLock

from .coordinator import CoordinatorActor, tokens_per_s
from .metrics import ports_to_try
from .ray_env import alive_nodes, connect, loss_reason
from .worker import WorkerActor, WorkerConfig

log = logging.getLogger(__name__)

_POLL_S = 0.5


@dataclass(frozen=True)
class PoolConfig:
    address: str | None = None  # None: embedded local cluster (or the one this process already joined)
    workers: int | None = None  # None: one per node
    threads_per_worker: int | None = None  # None: all CPUs of the node
    slots: int | None = None  # None: DEFAULT_SLOTS (32), fewer if the KV cache would not fit the node's memory
    max_context: int | None = None
    head: str = "bf16"  # output head: "bf16" (exact) or "int8" (half the bytes per token)
    weights_format: str | None = None  # "2bit" / "1.6bit"; None: 2bit, or a converted model's own
    hang_timeout: float = 300.0  # seconds without progress before a worker is declared hung
    max_worker_restarts: int = 20
    object_store_memory: int | None = None
    faults: dict = field(default_factory=dict)  # test hooks, see WorkerConfig
    metrics_host: str = "127.0.0.1"  # where the coordinator serves Prometheus metrics
    metrics_port: int | None = None  # None: 9469, or a free port when that is taken; 0: a free port; -1: none
    pushgateway: str | None = None  # push the final metrics there


@dataclass(frozen=True)
class JobSummary:
    """The end of a job. rows, failed_rows and the token counts are the whole job's (a resumed job adds
    the earlier runs' shards, from the manifest); the `*_this_run` fields and tokens/s are this run's.
    Tokens are those of rows without an error."""

    output: str
    job_id: str
    state: str  # finished | cancelled | failed
    rows: int
    failed_rows: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    retries: int
    worker_restarts: int
    per_worker: dict
    error: str | None = None
    processing_s: float = 0.0  # this run: first shard handed out to last shard written
    scheduling: dict = field(default_factory=dict)  # the coordinator's own time, see Coordinator.stats
    rows_this_run: int = 0
    prompt_tokens_this_run: int = 0
    generated_tokens_this_run: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of this run / its processing time: what `status` and the progress bar show."""
        return tokens_per_s(self.generated_tokens_this_run, self.processing_s)

    @property
    def resumed(self) -> bool:
        return self.rows_this_run != self.rows


def summarize(output: str, job_id: str, state: str, stats: dict, wall_s: float, worker_restarts: int = 0,
              error: str | None = None) -> JobSummary:
    """A JobSummary from the coordinator's final `stats()`."""
    return JobSummary(
        output, job_id, state, stats["rows_done"], stats["failed_rows"],
        stats.get("job_prompt_tokens", stats["prompt_tokens"]),
        stats.get("job_generated_tokens", stats["generated_tokens"]),
        wall_s, stats["retries"], worker_restarts, stats["workers"], error, stats["processing_s"],
        stats.get("scheduling", {}), stats.get("rows_done_this_run", stats["rows_done"]),
        stats["prompt_tokens"], stats["generated_tokens"])


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
    inputs = open_inputs(spec.inputs)
    model_dir = str(resolve_model_dir(spec.model))
    cfg = validate_model(model_dir)  # config, tensor headers, tokenizer and chat template: before any worker
    shards = plan_shards(inputs, spec.shard_rows)
    manifest = Manifest.for_job(spec.output, spec, inputs, shards, model_fingerprint(model_dir))
    return Plan(spec, inputs, shards, manifest, model_dir, cfg)


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
    cfg = plan.config
    fmt = resolved_weights_format(plan.model_dir, pool.weights_format)
    try:
        ctx = context_length(cfg, pool.max_context)
    except ValueError as e:
        raise JobInputError(f"model {plan.model_dir}: {e}") from None
    fits = []
    for node in ray.nodes() if nodes is None else nodes:
        res = node.get("Resources", {})
        if not node.get("Alive") or res.get("CPU", 0) < 1 or "memory" not in res:
            continue
        memory, store = int(res["memory"]), int(res.get("object_store_memory", 0))
        slots = pool.slots
        if slots is None:
            fixed = footprint(cfg, fmt, pool.head, 0, ctx)
            room = (memory - fixed.total) // kv_bytes_per_slot(cfg, ctx)
            slots = max(1, min(auto_slots(cfg, ctx, memory), room))
        fits.append(NodeFit(node["NodeID"], node.get("NodeManagerAddress", "?"), memory, store, slots,
                            footprint(cfg, fmt, pool.head, slots, ctx),
                            fit_problem(cfg, fmt, pool.head, slots, ctx, memory, store)))
    return JobSizing(plan.model_dir, ctx, fmt, pool.head, pool.slots, tuple(fits))


def check_memory(plan: Plan, pool: PoolConfig) -> JobSizing:
    """Refuse, before any compute, a job one worker of which does not fit some node (see `size_job`)."""
    sizing = size_job(plan, pool)
    sizing.check()
    return sizing


class JobHandle:
    """A running job: `progress()`, `wait()`, `cancel()`, `output`."""

    def __init__(self, plan: Plan, pool: PoolConfig):
        self.plan, self.pool, self.output = plan, pool, plan.spec.output
        self.job_id = plan.manifest.job_id
        # the coordinator serves on this node: an explicit port is checked before starting anything
        self._metrics_ports = ports_to_try(pool.metrics_host, pool.metrics_port)
        self._lock = OutputLock(self.output)  # one run per OUT, taken before any write and before Ray starts
        self._lock.acquire()
        self._claimed = False  # True once OUT has been written (the manifest created or resumed)
        try:
            self._owns_ray = connect(pool.address, pool.object_store_memory)
            try:
                self._start(plan, pool)
            except BaseException:
                if self._owns_ray:
                    ray.shutdown()
                raise
        except BaseException:
            self._lock.release(undo=not self._claimed)  # a refused job leaves OUT as it was
            raise

    def _claim(self) -> str:
        """Create or resume OUT/_manifest.json and become its writer: the first writes of the job,
        made under the lock once every check has passed. The plan is checked again: a run that held
        OUT before us may have completed shards since `prepare`."""
        plan = self.plan
        fresh = Manifest.for_job(plan.spec.output, plan.spec, plan.inputs, plan.shards, plan.manifest.model)
        if fresh.resumed or plan.manifest.resumed:
            self.plan = replace(plan, manifest=fresh)
            self.job_id = fresh.job_id
        self.plan.manifest.create()
        self._claimed = True
        clear_cancel(self.output)
        return claim_output(self.output)  # a stale run of this job (killed driver) stops writing

    def _start(self, plan: Plan, pool: PoolConfig) -> None:
        check_memory(plan, pool)
        self._started = time.time()
        self._summary: JobSummary | None = None
        self._error: BaseException | None = None
        self._workers: dict[str, tuple] = {}  # worker_id -> (actor, run ref, node)
        self._restarts = 0
        self._cancel = threading.Event()
        self._done = threading.Event()
        run_id = self._claim()
        plan = self.plan
        here = ray.get_runtime_context().get_node_id()
        self.coordinator = CoordinatorActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
            plan.spec, plan.inputs, plan.shards, plan.manifest, plan.spec.max_retries,
            pool.metrics_host, self._metrics_ports, pool.pushgateway, run_id)
        try:
            port = ray.get(self.coordinator.metrics_endpoint.remote(), timeout=60)
        except RayActorError as e:  # e.g. the metrics port was taken meanwhile
            raise OSError(f"the job coordinator could not start: {e}") from None
        self.metrics_url = None if port is None else f"http://{pool.metrics_host}:{port}/metrics"
        if port is not None and port != self._metrics_ports[0] != 0:  # the default port was taken
            log.warning("metrics port %d on %s is taken (another job?): this job serves its metrics on port %d "
                        "(a Prometheus that scrapes port %d will not see it)", self._metrics_ports[0],
                        pool.metrics_host, port, self._metrics_ports[0])
        self._thread = threading.Thread(target=self._supervise, name="ternpool-supervisor", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------

    def progress(self) -> dict:
        if not ray.is_initialized():  # the job ended and stopped its cluster: a Ray call would start another
            raise RuntimeError(f"job {self.job_id} has ended: see wait()")
        return ray.get(self.coordinator.stats.remote(), timeout=30)

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobSummary:
        # an Event, not Thread.join: a join interrupted by Ctrl-C can leave the thread looking finished
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job_id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._summary

    @property
    def workers(self) -> dict:
        """worker_id -> actor handle (for inspection and fault tests)."""
        return {wid: w[0] for wid, w in self._workers.items()}

    # -- supervision -----------------------------------------------------------------------------

    def _start_worker(self, node: str) -> None:
        wid = f"w-{node[:8]}-{uuid.uuid4().hex[:6]}"
        cpus = self.pool.threads_per_worker or alive_nodes().get(node, 1.0)
        cfg = WorkerConfig(self.plan.model_dir, threads=self.pool.threads_per_worker, slots=self.pool.slots,
                           max_context=self.pool.max_context, truncate=self.plan.spec.truncate, head=self.pool.head,
                           weights_format=self.pool.weights_format, faults=self.pool.faults)
        actor = WorkerActor.options(
            num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            name=None).remote(wid, cfg, self.coordinator, self.plan.spec, self.plan.inputs.text_column)
        self._workers[wid] = (actor, actor.run.remote(), node)
        log.info("started worker %s on node %s (%d CPUs)", wid, node[:8], int(cpus))

    def _fill_nodes(self) -> None:
        nodes = alive_nodes()
        busy = {w[2] for w in self._workers.values()}
        for node in nodes:
            if self.pool.workers is not None and len(self._workers) >= self.pool.workers:
                return
            if node not in busy:
                self._start_worker(node)

    def _reap(self) -> None:
        refs = {w[1]: wid for wid, w in self._workers.items()}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            wid = refs[ref]
            actor, _, node = self._workers.pop(wid)
            try:
                rows = ray.get(ref, timeout=10)
                log.info("worker %s finished after %d rows", wid, rows)
            except (RayActorError, RayTaskError, GetTimeoutError) as e:
                if isinstance(e, RayTaskError):  # the worker's code raised: log it, replace the worker
                    log.error("worker %s failed: %s", wid, e)
                    ray.kill(actor, no_restart=True)
                n = ray.get(self.coordinator.worker_lost.remote(wid, type(e).__name__), timeout=30)
                log.warning("worker %s on node %s was lost (%s); %d piece(s) requeued", wid, node[:8],
                            loss_reason(e), n)
                self._restarts += 1
                if self._restarts > self.pool.max_worker_restarts:
                    raise RuntimeError(f"{self._restarts} worker losses: giving up (see the worker logs)") from e

    def _kill_hung(self) -> None:
        for wid in ray.get(self.coordinator.stale_workers.remote(self.pool.hang_timeout), timeout=30):
            if wid in self._workers:
                log.warning("worker %s made no progress for %.0f s: killing it, its work is requeued",
                            wid, self.pool.hang_timeout)
                ray.kill(self._workers[wid][0], no_restart=True)

    def _supervise(self) -> None:
        state = "failed"
        try:
            last_progress = 0.0
            while True:
                if self._cancel.is_set() or cancel_requested(self.output):
                    ray.get(self.coordinator.cancel.remote(), timeout=30)
                    state = "cancelled"
                    break
                self._reap()
                stats = ray.get(self.coordinator.stats.remote(), timeout=30)
                if stats["done"]:
                    state = "finished"
                    break
                if stats.get("error"):  # a part file or the manifest could not be written: stop the workers
                    log.error("job %s failed: %s", self.job_id, stats["error"])
                    break
                self._kill_hung()
                self._fill_nodes()
                if time.monotonic() - last_progress > 1.0:
                    ray.get(self.coordinator.write_progress.remote("running"), timeout=30)
                    last_progress = time.monotonic()
                time.sleep(_POLL_S)
        except BaseException as e:  # surfaced by wait()
            self._error = e
        finally:
            self._finish(state)

    def _finish(self, state: str) -> None:
        try:
            try:
                stats = ray.get(self.coordinator.write_progress.remote(state), timeout=30)
            except Exception as e:  # the coordinator is gone (e.g. the cluster was stopped): use the manifest
                log.warning("coordinator unreachable at the end of the job (%s); summary from the manifest", e)
                stats = self._stats_from_manifest(state)
            for actor in [w[0] for w in self._workers.values()] + [self.coordinator]:
                try:
                    if actor is self.coordinator:
                        ray.get(actor.shutdown.remote(), timeout=10)
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
            self._workers.clear()
            if state == "cancelled":
                clear_cancel(self.output)
            if state == "failed":  # status shows failed and why
                progress = read_progress(self.output) or {}
                write_progress(self.output, dict(progress, state="failed", updated=time.time(),
                                                 error=str(self._error) if self._error is not None
                                                 else stats.get("error") or "the job failed"))
            error = self._error if self._error is not None else stats.get("error")
            self._summary = summarize(self.output, self.job_id, state, stats, time.time() - self._started,
                                      self._restarts, None if error is None else str(error))
        finally:
            if self._owns_ray:
                ray.shutdown()
            self._lock.release()
            self._done.set()

    def _stats_from_manifest(self, state: str) -> dict:
        m = Manifest.load(self.output)
        stats = {"rows_done": sum(v["rows"] for v in m.completed.values()),
                 "failed_rows": sum(v.get("failed_rows", 0) for v in m.completed.values()),
                 "job_prompt_tokens": sum(v.get("prompt_tokens", 0) for v in m.completed.values()),
                 "job_generated_tokens": sum(v.get("generated_tokens", 0) for v in m.completed.values()),
                 "prompt_tokens": 0, "generated_tokens": 0, "retries": 0, "workers": {}, "processing_s": 0.0}
        try:
            write_progress(self.output, dict(stats, state=state, job_id=m.job_id, rows_total=m.num_rows,
                                             shards_total=m.num_shards, shards_done=len(m.completed)))
        except OSError as e:  # e.g. a full disk: progress is advisory, the summary still reports the job
            log.error("could not write the progress file of %s: %s", self.output, e)
        return stats


def submit(inputs: str, model: str, output: str, *, pool: PoolConfig | None = None, **job) -> JobHandle:
    """Validate and start a batch job; returns at once with a `JobHandle`.

    `job` takes the `JobSpec` fields: max_tokens, temperature, top_p, top_k, seed, stop,
    shard_rows, max_retries, truncate.
    """
    plan = prepare(JobSpec(inputs=inputs, output=output, model=model, **job))
    return JobHandle(plan, pool or PoolConfig())


def request_job_cancel(output: str) -> None:
    """What `ternpool cancel OUT` does: the driver polls OUT/_cancel."""
    request_cancel(output)
