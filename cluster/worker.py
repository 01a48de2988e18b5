"""The worker actor: one per node, owning that node's CPUs for Numba threads.

`run()` pulls pieces of shards from the coordinator whenever the engine has
a free slot and streams their rows into the engine's continuous batching,
so the next shard starts while the last rows of the previous one finish.
Finished pieces go back to the coordinator with their results.

The driver starts `worker_actor(Worker)`; `submit(..., worker_cls=...)` takes a subclass instead. The
fault tests use that to make a worker slow, crash or hang on chosen prompts
(tests/cluster/faulty_worker.py): this module has no test-only code paths.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import ray

from ternpool.engine import Engine, Request, Result, SamplingParams
from ternpool.engine.options import EngineConfig
from ternpool.jobs.rows import RowRequest, to_requests

from .coordinator import DONE, WAIT

log = logging.getLogger(__name__)

_HEARTBEAT_S = 1.0
_IDLE_WAIT_S = 0.05


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)  # threads None: all CPUs Ray gave this worker


@dataclass
class _Pending:
    rows: int
    results: dict = field(default_factory=dict)  # row_index -> Result


class Worker:
    def __init__(self, worker_id: str, config: WorkerConfig, coordinator, spec, text_column: str):
        self.worker_id, self.config, self.coordinator = worker_id, config, coordinator
        self.spec, self.text_column = spec, text_column
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.engine = Engine.load(config.model, config.engine, threads=config.engine.threads or max(1, int(cpus)))
        # compile / load every kernel now, so that the first shard does not pay for it
        self.engine.generate([Request("warm-up", prompt_token_ids=[self.engine.config.bos_token_id],
                                      params=SamplingParams(max_tokens=2))])
        self.node = ray.get_runtime_context().get_node_id()
        self.pending: dict[tuple, _Pending] = {}
        self.sent: list = []  # completions not yet acknowledged by the coordinator
        self.last_beat = 0.0
        # seconds the engine stood still waiting on the coordinator: in lease calls, and idle with no work
        self.lease_s = self.idle_s = 0.0
        self.cpu_at_start = time.process_time()  # the job's core-seconds count from here (after the warm-up)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "node": self.node, "pid": os.getpid(), "threads": self.engine.threads}

    def _beat(self, _tokens: int = 0) -> None:
        """Called after every engine step and while idle: a heartbeat to the coordinator once a second."""
        now = time.monotonic()
        if now - self.last_beat >= _HEARTBEAT_S:
            self.last_beat = now
            self.coordinator.heartbeat.remote(self.worker_id, self.engine.running, self._waits(), self._core_s())

    def _waits(self) -> tuple[float, float]:
        return self.lease_s, self.idle_s

    def _core_s(self) -> float:
        """CPU seconds of this process (every thread: Numba's included) since the warm-up."""
        return time.process_time() - self.cpu_at_start

    def _source(self):
        """The engine's requests, one per row of the leased pieces (None while the coordinator says WAIT),
        keyed (piece key, row_index)."""
        while True:
            t0 = time.perf_counter()
            lease = ray.get(self.coordinator.lease.remote(self.worker_id), timeout=120)
            self.lease_s += time.perf_counter() - t0
            if lease == DONE:
                return
            if lease == WAIT:
                if self.engine.running == 0:
                    t0 = time.perf_counter()
                    time.sleep(_IDLE_WAIT_S)
                    self.idle_s += time.perf_counter() - t0
                    self._beat()
                yield None
                continue
            key, table = lease
            pending = self.pending[tuple(key)] = _Pending(table.num_rows)
            for rr in self._requests(table):
                if rr.request is None:
                    pending.results[rr.row_index] = Result.failed(rr.row_index, rr.error)
                    continue
                yield Request((tuple(key), rr.row_index), rr.request.prompt, rr.request.messages,
                              rr.request.params, rr.request.prompt_token_ids)
            self._finish_if_complete(tuple(key))

    def _requests(self, table) -> list[RowRequest]:
        """The rows of a leased piece as requests; a piece that cannot be converted at all fails each
        of its rows with the reason (the worker goes on)."""
        try:
            return to_requests(table, self.spec, self.text_column)
        except Exception as e:
            rows = table.column("row_index").to_pylist()
            log.error("rows %d..%d cannot be converted to requests: %s: %s", rows[0], rows[-1], type(e).__name__, e)
            return [RowRequest(r, None, f"row {r}: {type(e).__name__}: {e}") for r in rows]

    def _finish_if_complete(self, key: tuple) -> None:
        p = self.pending.get(key)
        if p is not None and len(p.results) == p.rows:
            del self.pending[key]
            # not awaited here: the engine goes on while the coordinator writes the shard
            self.sent.append(self.coordinator.complete.remote(self.worker_id, key, list(p.results.values()),
                                                              self._waits(), self._core_s()))
            self._check_sent()

    def _check_sent(self, wait: bool = False) -> None:
        if self.sent:
            done, self.sent = ray.wait(self.sent, num_returns=len(self.sent), timeout=None if wait else 0)
            ray.get(done)  # surfaces a coordinator error here

    def run(self) -> int:
        """Work until the coordinator has nothing left; returns the rows this worker finished."""
        ray.get(self.coordinator.register.remote(self.worker_id, self.node, self.engine.model.slots,
                                                 self.engine.model.weights.nbytes), timeout=60)
        done = 0
        for res in self.engine.stream(self._source(), on_step=self._beat):
            key, row_index = res.key
            self.pending[key].results[row_index] = _rekey(res, row_index)
            done += 1
            self._finish_if_complete(key)
        self._check_sent(wait=True)
        return done


def _rekey(res: Result, key) -> Result:
    return replace(res, key=key, prompt_token_ids=())


def worker_actor(cls: type[Worker] = Worker):
    """`cls` (Worker or a subclass) as the Ray actor class that the driver starts, one per node."""
    return ray.remote(max_concurrency=2, max_restarts=0)(cls)
