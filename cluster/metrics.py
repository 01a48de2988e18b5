"""Prometheus metrics of a batch job, served by the coordinator while the job runs.

Every series carries `job_id` (never `job`: Prometheus overwrites that label
with its scrape job's name); per-worker series add `worker` and `node`.
Counters move when a shard is written to the output, so at the end they
equal the rows in the output and the tokens of its rows without an error. The final values are also written
to `OUT/_metrics.prom` (text exposition format) for jobs shorter than a
scrape interval, and can be pushed to a Pushgateway.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, push_to_gateway

from ternpool.jobs.storage import METRICS_FILE  # noqa: F401 (one list of the names ternpool writes in OUT)

log = logging.getLogger(__name__)

DEFAULT_PORT = 9469
OFF = -1  # `metrics_port` / `--metrics-port` value for no endpoint
_RATE_WINDOW_S = 30.0

J = ("job_id",)
W = ("job_id", "worker", "node")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))
_SHARD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))

# name -> (type, labels, help): the single list the dashboard test checks queries against
SPEC = {
    "ternpool_rows_total": ("gauge", J, "Rows in the job's input"),
    "ternpool_rows_done": ("counter", J, "Rows written to the output (failed rows included)"),
    "ternpool_rows_failed": ("counter", J, "Rows written with an error"),
    "ternpool_prompt_tokens": ("counter", W, "Prompt tokens of rows written to the output without an error"),
    "ternpool_generated_tokens": ("counter", W, "Generated tokens of rows written to the output without an error"),
    "ternpool_prefix_cache_hit_tokens": ("counter", W, "Prompt tokens of rows written without an error whose keys "
                                         "and values came from the worker's prefix cache: prefill saved"),
    "ternpool_shard_retries": ("counter", J, "Pieces of shards requeued after their worker was lost"),
    "ternpool_worker_restarts": ("counter", J, "Workers lost (died, removed or hung) and replaced"),
    "ternpool_shards_queued": ("gauge", J, "Shard pieces waiting for a worker"),
    "ternpool_shards_in_flight": ("gauge", J, "Shard pieces held by workers"),
    "ternpool_active_workers": ("gauge", J, "Workers that have registered and are not lost"),
    "ternpool_tokens_per_second": ("gauge", W, f"Generated tokens per second over the last {_RATE_WINDOW_S:.0f} s"),
    "ternpool_kv_slots_in_use": ("gauge", W, "Sequences in a worker's KV cache"),
    "ternpool_kv_slots": ("gauge", W, "KV cache slots of a worker"),
    "ternpool_model_resident_bytes": ("gauge", W, "Bytes of model weights a worker holds (mapped, shared per node)"),
    "ternpool_worker_wait_seconds": ("counter", W, "Seconds a worker's engine stood still waiting on the coordinator "
                                     "(lease calls, and no work to run)"),
    "ternpool_coordinator_busy_seconds": ("counter", J, "Seconds the coordinator spent handing out shards and "
                                          "writing finished ones"),
    "ternpool_eta_seconds": ("gauge", J, "Estimated seconds until every row is written"),
    "ternpool_worker_cpu_seconds": ("counter", W, "CPU seconds of a worker's process (all its threads) since its "
                                    "warm-up: core-seconds"),
    "ternpool_core_seconds_per_million_generated_tokens": ("gauge", J, "This run's worker core-seconds per million "
                                                           "generated tokens"),
    "ternpool_core_seconds_per_million_prompt_tokens": ("gauge", J, "This run's worker core-seconds per million "
                                                        "prompt tokens"),
    "ternpool_dollars_per_million_generated_tokens": ("gauge", J, "Dollars (nodes x processing time x --node-price) "
                                                      "per million generated tokens"),
    "ternpool_dollars_per_million_prompt_tokens": ("gauge", J, "Dollars (nodes x processing time x --node-price) "
                                                   "per million prompt tokens"),
    "ternpool_shard_duration_seconds": ("histogram", J, "Seconds from a shard's first lease to its part file"),
    "ternpool_request_latency_seconds": ("histogram", W, "Seconds from a row's admission to its result"),
    "ternpool_time_to_first_token_seconds": ("histogram", W, "Seconds from a row's admission to its first token"),
}


def exported_names() -> set[str]:
    """Every sample name Prometheus will see (counters get _total, histograms _bucket/_sum/_count)."""
    out = set()
    for name, (kind, _, _) in SPEC.items():
        if kind == "counter":
            out.add(name + "_total")
        elif kind == "histogram":
            out.update({name + "_bucket", name + "_sum", name + "_count"})
        else:
            out.add(name)
    return out


def check_port_free(host: str, port: int) -> None:
    """Raise a clear error when host:port cannot be bound (port 0 always can)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"metrics port {port} on {host} is not available ({e.strerror}); choose another "
                          f"with --metrics-port, or --metrics-port 0 to pick a free one") from None


def ports_to_try(host: str, port: int | None) -> tuple[int, ...] | None:
    """What the coordinator tries to serve on, in order, for a job's `metrics_port`: None (the
    default) is DEFAULT_PORT or, when that is taken (say by another job on this machine), a free
    port; OFF is no endpoint; any other number is exactly that port (0: a free one), which is
    checked here, before anything starts, with a clear error when it is taken."""
    if port is None:
        return (DEFAULT_PORT, 0)
    if port == OFF:
        return None
    if port < 0:
        raise ValueError(f"metrics port {port}: expected a port number, 0 (a free port) or {OFF} (no endpoint)")
    check_port_free(host, port)
    return (port,)


class JobMetrics:
    def __init__(self, job_id: str, rows_total: int):
        self.job_id = job_id
        self.registry = CollectorRegistry()
        self.m = {}
        for name, (kind, labels, doc) in SPEC.items():
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
            kw = {}
            if kind == "histogram":
                kw["buckets"] = _SHARD_BUCKETS if "shard" in name else _LATENCY_BUCKETS
            self.m[name] = cls(name, doc, labels, registry=self.registry, **kw)
        self.m["ternpool_rows_total"].labels(job_id).set(rows_total)
        for name in ("ternpool_rows_done", "ternpool_rows_failed", "ternpool_shard_retries",
                     "ternpool_worker_restarts", "ternpool_coordinator_busy_seconds"):
            self.m[name].labels(job_id)  # present (at 0) from the start
        self.recent: dict[tuple[str, str], deque] = {}  # (worker, node) -> (time, tokens) events
        self.rows_rate: deque = deque()  # (time, rows done) samples for the ETA
        self.server = None
        self.port: int | None = None

    def serve(self, host: str, ports: int | tuple[int, ...]) -> int:
        """Serve on the first of `ports` that can be bound (see `ports_to_try`: the coordinator's
        `metrics_port` is what it returned); returns the port."""
        from prometheus_client import start_http_server

        ports = (ports,) if isinstance(ports, int) else tuple(ports)
        for i, port in enumerate(ports):
            try:
                self.server, _ = start_http_server(port, addr=host, registry=self.registry)
                break
            except OSError as e:
                if i + 1 < len(ports):
                    log.info("metrics port %d on %s is taken (%s); trying %s", port, host, e.strerror,
                             ports[i + 1] or "a free one")
                    continue
                raise OSError(f"cannot serve metrics on {host}:{port} ({e.strerror}); choose another "
                              "--metrics-port, or --metrics-port 0 to pick a free one") from None
        self.port = self.server.server_port
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _w(self, name: str, worker: str, node: str):
        return self.m[name].labels(self.job_id, worker, node)

    def _j(self, name: str):
        return self.m[name].labels(self.job_id)

    # -- events ----------------------------------------------------------------------------------

    def worker_registered(self, worker: str, node: str, slots: int, model_bytes: int) -> None:
        self._w("ternpool_kv_slots", worker, node).set(slots)
        self._w("ternpool_model_resident_bytes", worker, node).set(model_bytes)
        self._w("ternpool_kv_slots_in_use", worker, node).set(0)
        self._w("ternpool_generated_tokens", worker, node)
        self._w("ternpool_prompt_tokens", worker, node)
        self._w("ternpool_prefix_cache_hit_tokens", worker, node)
        self._w("ternpool_worker_wait_seconds", worker, node)
        self._w("ternpool_worker_cpu_seconds", worker, node)

    def worker_heartbeat(self, worker: str, node: str, running: int) -> None:
        self._w("ternpool_kv_slots_in_use", worker, node).set(running)

    def worker_waited(self, worker: str, node: str, seconds: float) -> None:
        self._w("ternpool_worker_wait_seconds", worker, node).inc(seconds)

    def worker_cpu(self, worker: str, node: str, seconds: float) -> None:
        self._w("ternpool_worker_cpu_seconds", worker, node).inc(seconds)

    def cost(self, cost) -> None:
        """The per-million-token figures of a `cluster.cost.JobCost` (a figure that is not known yet, or
        dollars without a node price, is left unset)."""
        for name, value in (("core_seconds_per_million_generated_tokens", cost.core_s_per_m_generated_tokens),
                            ("core_seconds_per_million_prompt_tokens", cost.core_s_per_m_prompt_tokens),
                            ("dollars_per_million_generated_tokens", cost.dollars_per_m_generated_tokens),
                            ("dollars_per_million_prompt_tokens", cost.dollars_per_m_prompt_tokens)):
            if value is not None:
                self._j("ternpool_" + name).set(value)

    def coordinator_busy(self, seconds: float) -> None:
        self._j("ternpool_coordinator_busy_seconds").inc(seconds)

    def worker_lost(self, worker: str, node: str) -> None:
        self._j("ternpool_worker_restarts").inc()
        for name in ("ternpool_kv_slots_in_use", "ternpool_tokens_per_second", "ternpool_model_resident_bytes"):
            self._w(name, worker, node).set(0)

    def retried(self, pieces: int = 1) -> None:
        self._j("ternpool_shard_retries").inc(pieces)

    def requests_done(self, worker: str, node: str, results) -> None:
        """A worker's piece was accepted: latency and time-to-first-token per row."""
        for r in results:
            if r.latency is not None:
                self._w("ternpool_request_latency_seconds", worker, node).observe(r.latency)
            if r.time_to_first_token is not None:
                self._w("ternpool_time_to_first_token_seconds", worker, node).observe(r.time_to_first_token)

    def shard_written(self, rows: int, failed: int, seconds: float, tokens_by_worker: dict) -> None:
        self._j("ternpool_rows_done").inc(rows)
        self._j("ternpool_rows_failed").inc(failed)
        self._j("ternpool_shard_duration_seconds").observe(seconds)
        now = time.monotonic()
        for (worker, node), (prompt, generated, cached) in tokens_by_worker.items():
            self._w("ternpool_prompt_tokens", worker, node).inc(prompt)
            self._w("ternpool_prefix_cache_hit_tokens", worker, node).inc(cached)
            self._w("ternpool_generated_tokens", worker, node).inc(generated)
            self.recent.setdefault((worker, node), deque()).append((now, generated))

    def queue(self, queued: int, in_flight: int, active_workers: int, rows_done: int, rows_total: int) -> float | None:
        """Update the queue gauges; returns the ETA in seconds (remaining rows / the row rate over the last
        window), 0 when every row is done, None while no rows were done in the window."""
        self._j("ternpool_shards_queued").set(queued)
        self._j("ternpool_shards_in_flight").set(in_flight)
        self._j("ternpool_active_workers").set(active_workers)
        now = time.monotonic()
        total_rate = 0.0
        for (worker, node), events in self.recent.items():
            while events and now - events[0][0] > _RATE_WINDOW_S:
                events.popleft()
            rate = sum(n for _, n in events) / _RATE_WINDOW_S
            total_rate += rate
            self._w("ternpool_tokens_per_second", worker, node).set(rate)
        self.rows_rate.append((now, rows_done))
        while self.rows_rate and now - self.rows_rate[0][0] > _RATE_WINDOW_S:
            self.rows_rate.popleft()
        eta = None
        if rows_done >= rows_total:
            eta = 0.0
        elif len(self.rows_rate) >= 2 and self.rows_rate[-1][1] > self.rows_rate[0][1]:
            (t0, r0), (t1, r1) = self.rows_rate[0], self.rows_rate[-1]
            eta = (rows_total - rows_done) * (t1 - t0) / (r1 - r0)
        if eta is not None:
            self._j("ternpool_eta_seconds").set(eta)
        return eta

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def write_file(self, output: str) -> str:
        """Write the current values to OUT/_metrics.prom; returns its path."""
        from ternpool.jobs import storage

        fs, base = storage.resolve(output)
        path = storage.join(base, METRICS_FILE)
        storage.write_bytes_atomic(fs, path, self.exposition())
        return path

    def push(self, gateway: str) -> None:
        push_to_gateway(gateway, job="ternpool", registry=self.registry, grouping_key={"job_id": self.job_id})
