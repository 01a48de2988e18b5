"""Connecting to Ray: the embedded local cluster by default, an existing one with an address.

The embedded cluster is a single machine's: every process of it (GCS, raylet, agents, workers'
gRPC servers) listens on 127.0.0.1 only. Ray turns a `127.0.0.1` node address into the machine's
routable one unless it runs as a single-machine cluster (its Windows/macOS mode, switched by
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); in that mode every component binds to loopback. A multi-node
cluster is the user's own (`ray start --head --node-ip-address ...`), joined with an address.

Ray writes nothing of its own to the driver's terminal: no colour codes, no `(raylet)` or
`(Worker pid=...)` prefixed lines (workers' logs stay in Ray's session directory, /tmp/ray/session_*/logs;
the driver logs lost and failed workers itself, with Ray's reason: `loss_reason`), and no notice
that token authentication is on (it is, as Ray's default).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager

import ray
from ray._private import ray_constants

log = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024  # prompts and results only; the model is mapped from disk
LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Ray environment variables read when it prints: plain text, and nothing of the workers' output
_QUIET_ENV = {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "1"}


def connect(address: str | None, object_store_memory: int | None = None) -> bool:
    """Make sure this process is connected to Ray. Returns True when we started the cluster
    (and so should shut it down)."""
    if ray.is_initialized():
        return False
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if address is None:
        # Ctrl-C in a terminal goes to the whole foreground process group: the embedded cluster's
        # processes (started now, inheriting this signal mask) must not die of it; the driver
        # handles it and stops the job cleanly.
        blocked = _block_sigint()
        try:
            with _single_machine(), _without_auth_notice():
                ray.init(address="local", _node_ip_address=LOOPBACK,
                         object_store_memory=object_store_memory or DEFAULT_OBJECT_STORE_BYTES, **kwargs)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        _mute_ray_messages()
        log.info("started an embedded local Ray cluster on %s", LOOPBACK)
        return True
    ray.init(address=address, **kwargs)
    _mute_ray_messages()
    return False


def _mute_ray_messages() -> None:
    """Ray prints the errors its raylets publish (a worker died, memory is low) to the driver's stderr
    as `(raylet) ...` lines, whatever log_to_driver says; the flag below is the one Ray's own debugger
    uses to silence them. The driver reports each lost worker with Ray's reason instead."""
    import ray._private.worker

    ray._private.worker._worker_logs_enabled = False


def loss_reason(e: BaseException) -> str:
    """One line on why an actor was lost, from Ray's error (its exit detail when it has one)."""
    text = " ".join(str(e).split())
    detail = text.split("Worker exit detail:", 1)[1] if "Worker exit detail:" in text else ""
    detail = detail.split(" Some common causes", 1)[0].strip()
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


@contextmanager
def _single_machine():
    """Ray's single-machine mode while the embedded cluster starts: its processes (which inherit the
    environment) and this one take 127.0.0.1 as the node's address and bind to it. Restored after,
    so that a later `connect(address)` in this process joins a real cluster normally."""
    saved_env, saved_flag = os.environ.get(_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env


class _DropAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


@contextmanager
def _without_auth_notice():
    """Ray 2.60 turns token authentication on for a new local cluster and logs a notice about it
    to stderr, which a user of ternpool cannot act on: drop that one record (auth stays on, and
    RAY_AUTH_MODE set by the user is respected as Ray does; Ray's other notices still show)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _DropAuthNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _block_sigint() -> bool:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return False
    return signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def alive_nodes() -> dict[str, float]:
    """node id -> CPUs, for every alive node with at least one CPU."""
    return {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= 1}
