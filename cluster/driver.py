"""Submitting a batch job: validate, plan, start the coordinator and one worker per node, supervise.

The plan (`cluster/plan.py`) and the sizing against every node (`cluster/sizing.py`) come first.
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
from dataclasses import replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ternpool.jobs import JobSpec, Manifest
from ternpool.jobs.openai_output import wants_openai, write_openai_files
from ternpool.jobs.progress import (cancel_requested, claim_output, clear_cancel, read_progress, request_cancel,
                                    write_progress)
from ternpool.jobs.runlock import OutputLock

from .coordinator import CoordinatorActor
from .metrics import ports_to_try
from .plan import Plan, PoolConfig, prepare, worker_engine  # noqa: F401 (prepare: the driver's API too)
from .ray_env import alive_nodes, connect, loss_reason
from .sizing import check_memory
from .stats import JobStats, JobSummary, summarize
from .worker import Worker, WorkerConfig, worker_actor

log = logging.getLogger(__name__)

_POLL_S = 0.5


class ProgressUnavailable(RuntimeError):
    """`JobHandle.progress()` could not reach the coordinator: the job is ending (its coordinator is gone,
    its cluster stopped) or the coordinator did not answer in time. `wait()` tells how the job ended."""


class StillRunning(TimeoutError):
    """`JobHandle.wait(timeout)` returned before the job ended (a job that failed with a timeout of its
    own raises that one instead)."""


class JobHandle:
    """A running job: `progress()`, `wait()`, `cancel()`, `output`. `worker_cls` is the class of the worker
    actors (a `Worker` subclass: the fault tests inject theirs here)."""

    def __init__(self, plan: Plan, pool: PoolConfig, worker_cls: type[Worker] = Worker):
        self.plan, self.pool, self.output = plan, pool, plan.spec.output
        self.engine = worker_engine(plan.spec, pool.engine)
        self._worker_actor = worker_actor(worker_cls)
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
        self._ray_lock = threading.Lock()  # progress() never calls Ray while _finish stops it
        run_id = self._claim()
        plan = self.plan
        here = ray.get_runtime_context().get_node_id()
        self.coordinator = CoordinatorActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(
            plan.spec, plan.inputs, plan.shards, plan.manifest, plan.spec.max_retries,
            pool.metrics_host, self._metrics_ports, pool.pushgateway, run_id, pool.node_price,
            pool.prefix_affinity and pool.engine.prefix_cache)
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

    def progress(self) -> JobStats:
        """The coordinator's counts now; ProgressUnavailable when it does not answer (see there)."""
        # under the lock the job's end takes to stop Ray: a Ray call after that would start another
        # cluster (and fail: "owner unknown")
        with self._ray_lock:
            if not ray.is_initialized():  # the job ended and stopped its cluster
                raise ProgressUnavailable(f"job {self.job_id} has ended: see wait()")
            try:
                return ray.get(self.coordinator.stats.remote(), timeout=30)
            except RayError as e:
                raise ProgressUnavailable(f"job {self.job_id}: its coordinator did not answer "
                                          f"({type(e).__name__}: {e}); see wait()") from e

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> JobSummary:
        # an Event, not Thread.join: a join interrupted by Ctrl-C can leave the thread looking finished
        if not self._done.wait(timeout):
            raise StillRunning(f"job {self.job_id} still running after {timeout} s")
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
        cpus = self.engine.threads or alive_nodes().get(node, 1.0)
        cfg = WorkerConfig(self.plan.model_dir, self.engine)
        actor = self._worker_actor.options(
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
                if stats.done:
                    state = "finished"
                    break
                if stats.error:  # a part file or the manifest could not be written: stop the workers
                    log.error("job %s failed: %s", self.job_id, stats.error)
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
            except RayError as e:  # the coordinator is gone (e.g. the cluster was stopped): use the manifest
                log.warning("coordinator unreachable at the end of the job (%s); summary from the manifest", e)
                stats = self._stats_from_manifest(state)
            for actor in [w[0] for w in self._workers.values()] + [self.coordinator]:
                try:
                    if actor is self.coordinator:
                        ray.get(actor.shutdown.remote(), timeout=10)
                    ray.kill(actor, no_restart=True)
                except RayError as e:  # already gone
                    log.info("actor %s of job %s was already gone at the end: %s", actor, self.job_id, e)
            self._workers.clear()
            if state == "finished" and wants_openai(self.plan.spec, self.plan.inputs):
                self._write_openai_files()
            if state == "cancelled":
                clear_cancel(self.output)
            if state == "failed":  # status shows failed and why
                progress = read_progress(self.output) or {}
                write_progress(self.output, dict(progress, state="failed", updated=time.time(),
                                                 error=str(self._error) if self._error is not None
                                                 else stats.error or "the job failed"))
            error = self._error if self._error is not None else stats.error
            self._summary = summarize(self.output, self.job_id, state, stats, time.time() - self._started,
                                      self._restarts, None if error is None else str(error))
        finally:
            if self._owns_ray:
                with self._ray_lock:
                    ray.shutdown()
            self._lock.release()
            self._done.set()

    def _write_openai_files(self) -> None:
        """OUT/output.jsonl and errors.jsonl from the finished job's parts; a failure is the job's error."""
        try:
            paths = write_openai_files(self.output)
            log.info("wrote %s and %s", *paths)
        except (OSError, ValueError) as e:
            log.error("job %s: the OpenAI output files could not be written: %s", self.job_id, e)
            if self._error is None:
                self._error = OSError(f"the job finished but its OpenAI output files could not be written ({e}); "
                                      "rerun the same command to write them")

    def _stats_from_manifest(self, state: str) -> JobStats:
        stats = JobStats.from_manifest(Manifest.load(self.output))
        try:
            write_progress(self.output, dict(stats.to_dict(), state=state))
        except OSError as e:  # e.g. a full disk: progress is advisory, the summary still reports the job
            log.error("could not write the progress file of %s: %s", self.output, e)
        return stats


def submit(inputs: str, model: str, output: str, *, pool: PoolConfig | None = None,
           worker_cls: type[Worker] = Worker, **job) -> JobHandle:
    """Validate and start a batch job; returns at once with a `JobHandle`.

    `job` takes the `JobSpec` fields: sampling (a SamplingParams: the job's defaults and seed),
    shard_rows, max_retries, truncate. `pool` says where and how it runs, its `engine` how each
    worker runs the model. `worker_cls`: see `JobHandle`.
    """
    plan = prepare(JobSpec(inputs=inputs, output=output, model=model, **job))
    return JobHandle(plan, pool or PoolConfig(), worker_cls)


def request_job_cancel(output: str) -> None:
    """What `ternpool cancel OUT` does: the driver polls OUT/_cancel."""
    request_cancel(output)
