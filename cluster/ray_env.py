"""Connecting to Ray: the embedded local cluster by default, an existing one with an address."""

from __future__ import annotations

import logging
import os
import signal
import threading

import ray

log = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 512 * 1024 * 1024  # prompts and results only; the model is mapped from disk


def connect(address: str | None, object_store_memory: int | None = None) -> bool:
    """Make sure this process is connected to Ray. Returns True when we started the cluster
    (and so should shut it down)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False)
    if address is None:
        # Ctrl-C in a terminal goes to the whole foreground process group: the embedded cluster's
        # processes (started now, inheriting this signal mask) must not die of it; the driver
        # handles it and stops the job cleanly.
        blocked = _block_sigint()
        try:
            ray.init(address="local", object_store_memory=object_store_memory or DEFAULT_OBJECT_STORE_BYTES,
                     **kwargs)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        log.info("started an embedded local Ray cluster")
        return True
    ray.init(address=address, **kwargs)
    return False


def _block_sigint() -> bool:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        return False
    return signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def alive_nodes() -> dict[str, float]:
    """node id -> CPUs, for every alive node with at least one CPU."""
    return {n["NodeID"]: n["Resources"].get("CPU", 0.0) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0.0) >= 1}
