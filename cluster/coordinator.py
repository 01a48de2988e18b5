"""The coordinator actor: owns the shard queue, leases work to workers, writes finished shards.

Workers pull (`lease`) when they have room; a lease is a piece of a shard
(the whole shard at first) with its rows as an Arrow table, so prompts and
results travel through Ray and workers need no shared file system. When
every row of a shard has a result, the coordinator writes its part file
(temporary name, then rename) and records it in the manifest: a shard is
written exactly once, whatever was lost on the way.

Recovery: a piece whose worker is lost goes back to the queue, split until
a row that keeps killing its worker is alone and then written with an error
while the rest of its shard succeeds (`cluster/pieces.py`).

Write failures: a part file or manifest write that raises OSError (disk full, I/O error, permission)
keeps the shard's results in memory and is retried up to `WRITE_ATTEMPTS` times, `WRITE_BACKOFF_S`
apart and doubling; the retries run from `stats()`, which the driver polls twice a second, so no call
holds the lock while waiting. When the attempts run out the job fails with the OS error: `stats()`
reports it, leases answer DONE, and the shards already written stay recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import ray

from ternpool.engine.requests import Result
from ternpool.jobs.manifest import Manifest
from ternpool.jobs.output import error_results, result_table, write_part
from ternpool.jobs.plan import Shard
from ternpool.jobs import storage
from ternpool.jobs.progress import PROGRESS_FILE, owns_output, write_progress
from ternpool.jobs.rows import ChunkCache, read_shard

from .affinity import Affinity, shard_signature
from .metrics import JobMetrics
from .pieces import Piece, PieceQueue
from .stats import JobStats, SchedulingStats, WorkerStats, processed_tokens

log = logging.getLogger(__name__)

DONE, WAIT = "done", "wait"
MANIFEST_SAVE_S = 0.0  # save the manifest at most this often while shards complete (and always at the end)
MANIFEST_SAVE_SHARE = 0.1  # and spend at most this share of the time saving it: a small manifest is saved at
# every shard (as status and resuming expect), a 100,000-shard one (6 MB, 0.3 s a save) every 3 s
WRITE_ATTEMPTS = 5  # tries of one part file or manifest save before the job fails with the OS error
WRITE_BACKOFF_S = 0.5  # wait before the second try; doubles after each failure (0.5 + 1 + 2 + 4 s in all)
_MANIFEST = "manifest"  # key of the manifest save in Coordinator._retry


@dataclass
class _WorkerState:
    node: str
    leased: dict = field(default_factory=dict)  # piece key -> Piece
    last_seen: float = field(default_factory=time.monotonic)
    rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    busy_since: float | None = None
    registered: float = field(default_factory=time.monotonic)
    lease_wait_s: float = 0.0  # the worker's own counts of time its engine stood still waiting on us:
    idle_s: float = 0.0  # in lease calls, and with nothing to run
    core_s: float = 0.0  # the worker's running total of its process's CPU seconds


class Coordinator:
    """Plain class; `CoordinatorActor` is its Ray actor."""

    def __init__(self, spec, inputs, shards: list[Shard], manifest: Manifest, max_retries: int,
                 metrics_host: str = "127.0.0.1", metrics_port: int | None = None, pushgateway: str | None = None,
                 run_id: str | None = None, node_price: float | None = None, prefix_affinity: bool = False):
        self.spec, self.inputs, self.manifest = spec, inputs, manifest
        self.node_price = node_price  # dollars per node-hour, for the cost figures
        self.run_id = run_id  # OUT/_owner must still name this run before anything is written
        self.metrics = JobMetrics(manifest.job_id, manifest.num_rows)
        self.metrics_port = None if metrics_port is None else self.metrics.serve(metrics_host, metrics_port)
        self.pushgateway = pushgateway
        self.shard_started: dict[int, float] = {}
        self.shard_tokens: dict[int, dict] = {}  # shard_id -> (worker, node) -> [prompt, generated, cached]
        self.lock = threading.RLock()
        self.queue = PieceQueue((s for s in shards if not manifest.is_done(s.shard_id)), max_retries)
        self.shards = {s.shard_id: s for s in shards}
        self.chunks = ChunkCache()  # leasing and writing a shard both read its input rows
        self.signatures: dict[int, str | None] = {}  # shard_id -> how its prompts start (cluster/affinity.py)
        self.affinity = Affinity(self._signature) if prefix_affinity else None
        self.partial: dict[int, dict[int, Result]] = {}  # shard_id -> row_index -> result
        self.workers: dict[str, _WorkerState] = {}
        self.lost: dict[str, _WorkerState] = {}  # kept for the per-worker summary
        self.cancelled = False
        self.retries = 0
        self.rows_done = sum(v["rows"] for v in manifest.completed.values())
        self.failed_rows = sum(v.get("failed_rows", 0) for v in manifest.completed.values())
        self.rows_at_start = self.rows_done
        self.prompt_tokens = 0  # of this run; earlier runs' are in the manifest's completed entries
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.prompt_tokens_before = sum(v.get("prompt_tokens", 0) for v in manifest.completed.values())
        self.generated_tokens_before = sum(v.get("generated_tokens", 0) for v in manifest.completed.values())
        self.cached_tokens_before = sum(v.get("cached_tokens", 0) for v in manifest.completed.values())
        self.eta_s: float | None = None  # remaining rows / recent row rate (JobMetrics.queue)
        self.started = time.time()
        self.first_lease: float | None = None  # processing time: first lease to last shard written
        self.last_written: float | None = None
        self.remaining = {s.shard_id for s in shards if not manifest.is_done(s.shard_id)}
        # scheduling overhead, for `ternpool bench cluster` and the busy-seconds metric
        self.lease_s = 0.0  # in lease(): picking a piece and reading its rows
        self.complete_s = 0.0  # in complete(): taking results, writing part files and the manifest
        self.write_s = 0.0  # of which writing part files and the manifest
        self.shards_written = 0
        self.pieces_leased = 0
        self._saved: float | None = None  # when the manifest was last saved (time.monotonic); None: never
        self._unsaved = 0  # shards recorded since
        self._save_s = 0.0  # how long the last save took (a 100,000-shard manifest is 6 MB: 0.3 s)
        self.shard_s = 0.0  # summed over written shards: first lease to part file
        self._retry: dict = {}  # shard_id or _MANIFEST -> (failed attempts, time.monotonic of the next try)
        self.error: str | None = None  # set when a write kept failing: the job has failed

    # -- workers ---------------------------------------------------------------------------------

    def register(self, worker_id: str, node: str, slots: int = 0, model_bytes: int = 0) -> None:
        with self.lock:
            self.workers.setdefault(worker_id, _WorkerState(node))
            self.metrics.worker_registered(worker_id, node, slots, model_bytes)

    def metrics_endpoint(self) -> int | None:
        return self.metrics_port

    def lease(self, worker_id: str):
        """The next piece for this worker: (key, Arrow table), WAIT (nothing queued now) or DONE."""
        t0 = time.perf_counter()
        with self.lock:
            w = self.workers.setdefault(worker_id, _WorkerState("?"))
            w.last_seen = time.monotonic()
            if self.cancelled or self.error is not None or not self.remaining:
                return DONE
            choose = (lambda pieces: self.affinity.choose(worker_id, pieces)) if self.affinity else None
            piece = self.queue.take(w.leased.values(), choose)
            if piece is None:
                return WAIT
            if self.affinity:
                self.affinity.leased(worker_id, piece)
            if self.first_lease is None:
                self.first_lease = time.time()
            self.shard_started.setdefault(piece.shard.shard_id, time.monotonic())
            w.leased[piece.key] = piece
            self.pieces_leased += 1
            w.busy_since = w.busy_since or time.monotonic()
        rows = read_shard(self.inputs, piece.shard, self.chunks)
        self._busy("lease_s", time.perf_counter() - t0)
        return piece.key, rows

    def _signature(self, piece: Piece) -> str | None:
        """Its shard's signature, read from the shard's rows the first time it is asked for (None when
        they cannot be read: the lease then reports why)."""
        sid = piece.shard.shard_id
        if sid not in self.signatures:
            try:
                rows = read_shard(self.inputs, self.shards[sid], self.chunks)
                self.signatures[sid] = shard_signature(rows.column(self.inputs.text_column).to_pylist())
            except Exception as e:  # noqa: BLE001 - an unreadable shard only loses its preference
                log.debug("no prefix signature for shard %d: %s", sid, e)
                self.signatures[sid] = None
        return self.signatures[sid]

    def _busy(self, what: str, seconds: float) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + seconds)
            self.metrics.coordinator_busy(seconds)

    def heartbeat(self, worker_id: str, running: int | None = None, waits: tuple | None = None,
                  core_s: float | None = None) -> None:
        with self.lock:
            w = self.workers.get(worker_id)
            if w is not None:
                w.last_seen = time.monotonic()
                if running is not None:
                    self.metrics.worker_heartbeat(worker_id, w.node, running)
                self._waited(worker_id, w, waits)
                self._used_cpu(worker_id, w, core_s)

    def _used_cpu(self, worker_id: str, w: _WorkerState, core_s: float | None) -> None:
        """Workers send the running total of their process's CPU seconds."""
        if core_s is not None and core_s > w.core_s:
            self.metrics.worker_cpu(worker_id, w.node, core_s - w.core_s)
            w.core_s = core_s

    def _waited(self, worker_id: str, w: _WorkerState, waits: tuple | None) -> None:
        """Workers send running totals of seconds spent waiting on the coordinator: (in lease calls, idle)."""
        if waits is None:
            return
        lease_s, idle_s = max(waits[0], w.lease_wait_s), max(waits[1], w.idle_s)
        added = lease_s + idle_s - w.lease_wait_s - w.idle_s
        if added > 0:
            self.metrics.worker_waited(worker_id, w.node, added)
        w.lease_wait_s, w.idle_s = lease_s, idle_s

    def complete(self, worker_id: str, key: tuple[int, int], results: list[Result],
                 waits: tuple | None = None, core_s: float | None = None) -> bool:
        """A worker finished a piece. Returns False when the lease was no longer its own."""
        t0 = time.perf_counter()
        try:
            return self._complete(worker_id, key, results, waits, core_s)
        finally:
            self._busy("complete_s", time.perf_counter() - t0)

    def _complete(self, worker_id: str, key: tuple[int, int], results: list[Result], waits: tuple | None,
                  core_s: float | None = None) -> bool:
        with self.lock:
            w = self.workers.get(worker_id)
            piece = w.leased.pop(tuple(key), None) if w else None
            if piece is None:
                return False  # lost and requeued meanwhile: the requeued copy will be written
            w.last_seen = time.monotonic()
            self._waited(worker_id, w, waits)
            self._used_cpu(worker_id, w, core_s)
            if not w.leased:
                w.busy_since = None
            w.rows += len(results)
            counts = processed_tokens(results)
            w.prompt_tokens += counts[0]
            w.generated_tokens += counts[1]
            w.cached_tokens += counts[2]
            tokens = self.shard_tokens.setdefault(piece.shard.shard_id, {}).setdefault((worker_id, w.node), [0, 0, 0])
            tokens[:] = (a + b for a, b in zip(tokens, counts))
            self.metrics.requests_done(worker_id, w.node, results)
            self._add_results(piece.shard.shard_id, {int(r.key): r for r in results})
        return True

    def worker_lost(self, worker_id: str, reason: str) -> int:
        """Requeue what a lost worker held; returns the number of pieces requeued."""
        with self.lock:
            w = self.workers.pop(worker_id, None)
            if w is None:
                return 0
            self.lost[worker_id] = w
            if self.affinity:
                self.affinity.forget(worker_id)
            self.metrics.worker_lost(worker_id, w.node)
            held, w.leased = list(w.leased.values()), {}
            self.metrics.retried(len(held))
            for piece in held:
                self._requeue(piece, reason)
            return len(held)

    def stale_workers(self, timeout: float) -> list[str]:
        """Workers holding work that have not made progress for `timeout` seconds."""
        now = time.monotonic()
        with self.lock:
            return [wid for wid, w in self.workers.items() if w.leased and now - w.last_seen > timeout]

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            self.queue.clear()

    # -- bookkeeping -----------------------------------------------------------------------------

    def _requeue(self, piece: Piece, reason: str) -> None:
        self.retries += 1
        row = self.queue.lost(piece, reason)
        if row is not None:
            self._add_results(piece.shard.shard_id, error_results(
                [row], f"row {row}: its worker was lost {piece.losses} times ({reason}); giving up"))

    def _add_results(self, shard_id: int, results: dict[int, Result]) -> None:
        got = self.partial.setdefault(shard_id, {})
        got.update(results)
        shard = self.shards[shard_id]
        if len(got) < shard.num_rows or shard_id not in self.remaining or shard_id in self._retry:
            return  # incomplete, already written, or waiting for its next write attempt
        if self.run_id is not None and not owns_output(self.manifest.output, self.run_id):
            log.error("%s is now written by another run of this job: this run stops without writing",
                      self.manifest.output)
            self.cancelled = True
            self.queue.clear()
            return
        self._write_shard(shard_id)

    def _write_shard(self, shard_id: int) -> None:
        """Write a shard whose results are all in: its part file, then its manifest record. A write
        that raises OSError leaves the results in `partial` for a retry (see `_write_failed`)."""
        shard, got = self.shards[shard_id], self.partial[shard_id]
        t0 = time.perf_counter()
        table = result_table(read_shard(self.inputs, shard, self.chunks), got, self.inputs.passthrough)
        try:
            write_part(self.manifest.output, shard_id, table)
        except OSError as e:
            self._write_failed(shard_id, f"part file of shard {shard_id} in {self.manifest.output}", e)
            return
        self._retry.pop(shard_id, None)
        failed = sum(1 for r in got.values() if r.error is not None)
        prompt, generated, cached = processed_tokens(got.values())
        # Saving rewrites the whole manifest: batched so that it takes at most 10% of the time, or a
        # 100,000-shard job would spend most of the coordinator's time there. A crash loses the records
        # since the last save; those shards are done again on resume and their part files replaced
        # (same names), never duplicated.
        self.manifest.record(shard_id, rows=shard.num_rows, failed_rows=failed, save=False,
                             prompt_tokens=prompt, generated_tokens=generated, cached_tokens=cached)
        self._unsaved += 1
        self._save_manifest(force=len(self.remaining) == 1)
        self.write_s += time.perf_counter() - t0
        self.last_written = time.time()
        took = time.monotonic() - self.shard_started.pop(shard_id, time.monotonic())
        self.shards_written += 1
        self.shard_s += took
        self.metrics.shard_written(shard.num_rows, failed, took, self.shard_tokens.pop(shard_id, {}))
        self.remaining.discard(shard_id)
        del self.partial[shard_id]
        self.rows_done += shard.num_rows
        self.failed_rows += failed
        self.prompt_tokens += prompt
        self.generated_tokens += generated
        self.cached_tokens += cached

    def _save_manifest(self, force: bool = False, retrying: bool = False) -> None:
        with self.lock:
            if _MANIFEST in self._retry and not retrying:
                return  # a failed save is retried by `_retry_writes` on its schedule
            wait = max(MANIFEST_SAVE_S, self._save_s / MANIFEST_SAVE_SHARE)
            never = self._saved is None
            if self._unsaved and (force or never or time.monotonic() - self._saved >= wait):
                t0 = time.monotonic()
                try:
                    self.manifest.save()
                except OSError as e:
                    self._write_failed(_MANIFEST, f"manifest of {self.manifest.output}", e)
                    return
                self._retry.pop(_MANIFEST, None)
                self._saved, self._unsaved = time.monotonic(), 0
                self._save_s = self._saved - t0

    def _write_failed(self, key, what: str, e: OSError) -> None:
        """A part file (key: shard_id) or the manifest (key: _MANIFEST) could not be written: schedule
        another try, or fail the job with the OS error once WRITE_ATTEMPTS tries have failed."""
        tries = self._retry.get(key, (0, 0.0))[0] + 1
        if tries >= WRITE_ATTEMPTS:
            if self.error is None:
                self.error = f"{type(e).__name__}: {e}" + ("" if self.manifest.output in str(e)
                                                           else f" (writing the {what})")
                log.error("the %s could not be written after %d tries: the job fails: %s", what, tries, self.error)
                self.queue.clear()
            self._retry[key] = (tries, float("inf"))
            return
        delay = WRITE_BACKOFF_S * 2 ** (tries - 1)
        log.warning("could not write the %s (try %d of %d, again in %.1f s; its results are kept): %s",
                    what, tries, WRITE_ATTEMPTS, delay, e)
        self._retry[key] = (tries, time.monotonic() + delay)

    def _retry_writes(self) -> None:
        """Try again the writes whose time has come (called from `stats`, which the driver polls)."""
        with self.lock:
            if self.error is not None:
                return
            now = time.monotonic()
            for key, (_, at) in sorted(self._retry.items(), key=lambda kv: str(kv[0])):
                if at > now or self.error is not None:
                    continue
                if key == _MANIFEST:
                    self._save_manifest(force=True, retrying=True)
                else:
                    self._write_shard(key)

    def stats(self) -> JobStats:
        """Counts for progress and the summary; also retries the writes that are due (see `_retry_writes`).
        `error` is set when the job failed (a write kept failing); `done` once every shard is written
        and recorded in a saved manifest."""
        self._retry_writes()
        with self.lock:
            now = time.monotonic()
            in_flight = sum(len(w.leased) for w in self.workers.values())
            self.eta_s = self.metrics.queue(len(self.queue), in_flight, len(self.workers), self.rows_done,
                                            self.manifest.num_rows)
            stats = JobStats(
                job_id=self.manifest.job_id,
                rows_total=self.manifest.num_rows,
                rows_done=self.rows_done,
                rows_done_this_run=self.rows_done - self.rows_at_start,
                failed_rows=self.failed_rows,
                shards_total=self.manifest.num_shards,
                shards_done=self.manifest.num_shards - len(self.remaining),
                queued=len(self.queue),
                in_flight=in_flight,
                retries=self.retries,
                prompt_tokens=self.prompt_tokens,
                generated_tokens=self.generated_tokens,
                job_prompt_tokens=self.prompt_tokens_before + self.prompt_tokens,
                job_generated_tokens=self.generated_tokens_before + self.generated_tokens,
                eta_s=self.eta_s,
                elapsed_s=max(time.time() - self.started, 1e-9),
                processing_s=((self.last_written or time.time()) - self.first_lease) if self.first_lease else 0.0,
                done=not self.remaining and _MANIFEST not in self._retry,
                error=self.error,
                cancelled=self.cancelled,
                active_workers=len(self.workers),
                scheduling=SchedulingStats(self.lease_s, self.complete_s, self.write_s, self.shards_written,
                                           self.shard_s, self.pieces_leased),
                workers={wid: WorkerStats(w.node, w.rows, w.prompt_tokens, w.generated_tokens, len(w.leased),
                                          wid in self.lost, w.lease_wait_s, w.idle_s,
                                          (w.last_seen if wid in self.lost else now) - w.registered, w.core_s,
                                          w.cached_tokens)
                         for wid, w in list(self.workers.items()) + list(self.lost.items())},
                node_price=self.node_price,
                cached_tokens=self.cached_tokens,
                job_cached_tokens=self.cached_tokens_before + self.cached_tokens,
            )
            self.metrics.cost(stats.cost)
            return stats

    def write_progress(self, state: str) -> JobStats:
        """Save what is pending, write OUT/_progress.json (`JobStats.to_dict()` with `state`, `updated`
        and `metrics_port`) and return the stats; a final `state` also writes the final metrics."""
        s = self.stats()
        if state == "finished" and self.manifest.finished is None:
            self.manifest.finished = time.time()
            self._unsaved += 1
        if state != "running" and s.workers:  # the run ends: its cost goes into the manifest
            self.manifest.cost = s.cost.to_dict()
            self._unsaved += 1
        # records batched since the last save (a final state tries once more a save that failed)
        self._save_manifest(force=state != "running", retrying=state != "running")
        if state != "running":  # the job ends: final metrics for jobs shorter than a scrape interval
            try:
                self.metrics.write_file(self.manifest.output)
            except OSError as e:
                log.error("could not write the final metrics file of %s: %s", self.manifest.output, e)
            if self.pushgateway:
                try:
                    self.metrics.push(self.pushgateway)
                except OSError as e:
                    log.error("could not push metrics to %s: %s", self.pushgateway, e)
        self._write_progress_file(dict(s.to_dict(), state=state, updated=time.time(),
                                        metrics_port=self.metrics_port))
        return s

    def _write_progress_file(self, data: dict) -> None:
        """Progress is advisory (status falls back to the manifest): on a full disk the old file is
        removed to make room for the new one (it is written next to it, then renamed); a write that
        still fails is logged, never raised."""
        try:
            write_progress(self.manifest.output, data)
            return
        except OSError as e:
            log.warning("could not write the progress file of %s (%s): removing the old one and trying again",
                        self.manifest.output, e)
        fs, base = storage.resolve(self.manifest.output)
        storage.delete_quietly(fs, storage.join(base, PROGRESS_FILE))
        try:
            write_progress(self.manifest.output, data)
        except OSError as e:
            log.error("could not write the progress file of %s: %s", self.manifest.output, e)

    def shutdown(self) -> None:
        self.metrics.stop()


CoordinatorActor = ray.remote(num_cpus=0, max_concurrency=16)(Coordinator)
