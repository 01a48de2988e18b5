"""Network defaults: the embedded cluster and the metrics endpoint answer on loopback only; a taken
default metrics port moves to a free one, an explicit one is refused."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess

import psutil
import pytest

from ternpool.cluster import metrics
from ternpool.cluster.driver import PoolConfig, submit
from ternpool.engine import EngineConfig, SamplingParams

from faulty_worker import faulty  # tests/cluster/faulty_worker.py
from helpers import CLI, wait_until, write_prompts

pytestmark = pytest.mark.cluster


def _listening(root: psutil.Process) -> list[tuple[int, str, str, int]]:
    """(pid, name, address, port) of every listening TCP socket of root and its descendants."""
    found = []
    for p in [root] + root.children(recursive=True):
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except psutil.NoSuchProcess:  # a worker that ended meanwhile
            continue
        found += [(p.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_the_embedded_cluster_listens_on_loopback_only(tmp_path, tiny_model):
    src = write_prompts(tmp_path / "p.parquet", 60)
    # slowed down so that the job is surely still running while the sockets are listed
    handle = submit(str(src), tiny_model, str(tmp_path / "out"), sampling=SamplingParams(max_tokens=8), shard_rows=10,
                    pool=PoolConfig(engine=EngineConfig(slots=4, threads=1), metrics_port=0),
                    worker_cls=faulty(step_delay=0.05))
    try:
        wait_until(lambda: handle.progress().active_workers >= 1, 120, "a worker active")
        sockets = _listening(psutil.Process())
    finally:
        summary = handle.wait(timeout=600)
    assert summary.state == "finished"
    names = {name for _, name, _, _ in sockets}
    # Ray's own servers and ours were all seen: the check below is not vacuous
    assert {"gcs_server", "raylet"} <= names, sockets
    assert any(port == int(handle.metrics_url.rsplit(":", 1)[1].split("/")[0]) for *_, port in sockets), sockets
    assert len({pid for pid, *_ in sockets}) >= 5, sockets  # driver, GCS, raylet, agents, coordinator, worker
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback (pid, process, address, port): {exposed}"


def _src(tmp_path):
    return write_prompts(tmp_path / "p.parquet", ["a", "b"])


def test_a_taken_default_metrics_port_moves_to_a_free_one(tmp_path, tiny_model, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        monkeypatch.setattr(metrics, "DEFAULT_PORT", taken)
        handle = submit(str(_src(tmp_path)), tiny_model, str(tmp_path / "out"),
                        sampling=SamplingParams(max_tokens=2),
                        pool=PoolConfig(engine=EngineConfig(slots=2, threads=1)))  # metrics_port None: the default
        summary = handle.wait(timeout=600)
    assert summary.state == "finished"
    port = int(handle.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert handle.metrics_url.startswith("http://127.0.0.1:") and port not in (taken, 0)


def test_the_cli_reports_the_port_it_moved_to_and_refuses_an_explicit_taken_one(tmp_path, tiny_model):
    src = _src(tmp_path)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", metrics.DEFAULT_PORT))
        except OSError:  # another job of this machine holds the default port: the same situation
            pass
        else:
            s.listen()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [*CLI, "submit", str(src), "-m", tiny_model, "--max-tokens", "2",
               "--threads-per-worker", "1"]
        moved = subprocess.run(cmd + ["-o", str(tmp_path / "a")], capture_output=True, text=True, env=env,
                               timeout=600)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        first = moved.stdout.splitlines()[0]
        assert "metrics: http://127.0.0.1:" in first and f":{metrics.DEFAULT_PORT}/" not in first, first
        refused = subprocess.run(cmd + ["-o", str(tmp_path / "b"), "--metrics-port", str(metrics.DEFAULT_PORT)],
                                 capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode != 0
    assert f"metrics port {metrics.DEFAULT_PORT} on 127.0.0.1 is not available" in refused.stderr, refused.stderr
    assert "finished" not in refused.stdout
