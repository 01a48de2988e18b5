"""Prometheus metrics of a running job: true numbers, a real Prometheus scraping them, port errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ternpool.cluster.driver import PoolConfig, submit
from ternpool.engine import EngineConfig, SamplingParams
from ternpool.jobs import read_output

from faulty_worker import faulty  # tests/cluster/faulty_worker.py
from helpers import write_prompts

pytestmark = pytest.mark.cluster


def _samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _total(samples, name: str) -> float:
    return sum(s.value for s in samples if s.name == name)


def test_final_metrics_equal_the_output(tmp_path, tiny_model, make_prompts):
    src = tmp_path / "p.parquet"
    bad = make_prompts(src, 200, seed=7)
    out = tmp_path / "out"
    handle = submit(str(src), tiny_model, str(out), sampling=SamplingParams(max_tokens=8), shard_rows=25,
                    pool=PoolConfig(engine=EngineConfig(slots=4, threads=1), metrics_port=0, node_price=0.5))
    assert handle.metrics_url.startswith("http://127.0.0.1:")
    live = urllib.request.urlopen(handle.metrics_url, timeout=10).read().decode()
    assert "ternpool_rows_total" in live
    summary = handle.wait(timeout=600)
    table = read_output(str(out))
    samples = _samples((out / "_metrics.prom").read_text())
    assert all(s.labels.get("job_id") == summary.job_id for s in samples if s.name.startswith("ternpool_"))
    assert not any("job" in s.labels for s in samples)
    assert _total(samples, "ternpool_rows_total") == 200
    assert _total(samples, "ternpool_rows_done_total") == table.num_rows == 200
    assert _total(samples, "ternpool_rows_failed_total") == len(bad)
    good = [e is None for e in table.column("error").to_pylist()]  # failed rows' tokens are not counted
    assert _total(samples, "ternpool_generated_tokens_total") == sum(
        n for n, g in zip(table.column("completion_tokens").to_pylist(), good) if g)
    assert _total(samples, "ternpool_prompt_tokens_total") == sum(
        n for n, g in zip(table.column("prompt_tokens").to_pylist(), good) if g)
    ok_rows = table.num_rows - len(bad)
    assert _total(samples, "ternpool_request_latency_seconds_count") == ok_rows
    assert _total(samples, "ternpool_time_to_first_token_seconds_count") == ok_rows
    assert _total(samples, "ternpool_shard_duration_seconds_count") == 8
    worker_series = [s for s in samples if s.name == "ternpool_generated_tokens_total"]
    assert worker_series and all(s.labels["worker"] and s.labels["node"] for s in worker_series)
    assert _total(samples, "ternpool_model_resident_bytes") > 0
    assert _total(samples, "ternpool_coordinator_busy_seconds_total") > 0
    waits = [s for s in samples if s.name == "ternpool_worker_wait_seconds_total"]
    assert waits and all(s.labels["worker"] for s in waits) and sum(s.value for s in waits) > 0

    # cost: the workers' CPU seconds against the tokens, the nodes' time against the price
    cost, generated = summary.cost, _total(samples, "ternpool_generated_tokens_total")
    core_s = _total(samples, "ternpool_worker_cpu_seconds_total")
    assert core_s == pytest.approx(cost.core_s, rel=0.05) and 0 < core_s <= summary.wall_s * os.cpu_count()
    assert (cost.generated_tokens, cost.prompt_tokens) == (generated, _total(samples, "ternpool_prompt_tokens_total"))
    assert cost.node_s == pytest.approx(summary.processing_s)  # one node
    assert _total(samples, "ternpool_core_seconds_per_million_generated_tokens") == pytest.approx(
        core_s / generated * 1e6, rel=0.05)
    assert _total(samples, "ternpool_dollars_per_million_generated_tokens") == pytest.approx(
        summary.processing_s / 3600 * 0.5 / generated * 1e6, rel=0.05)


def test_a_taken_port_is_a_clear_error(tmp_path, tiny_model):
    src = write_prompts(tmp_path / "p.parquet", ["a"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics port {port} on 127.0.0.1 is not available.*--metrics-port 0"):
            submit(str(src), tiny_model, str(tmp_path / "out"), pool=PoolConfig(metrics_port=port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, q: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]


def test_a_real_prometheus_scrapes_a_running_job(tmp_path, tiny_model):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs Debian's package 'prometheus')")
    src = write_prompts(tmp_path / "p.parquet", 300)
    metrics_port = _free_port()
    handle = submit(str(src), tiny_model, str(tmp_path / "out"), sampling=SamplingParams(max_tokens=16), shard_rows=10,
                    pool=PoolConfig(engine=EngineConfig(slots=4), metrics_port=metrics_port),
                    worker_cls=faulty(step_delay=0.02))
    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: ternpool
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{prom_port}"
    try:
        found = []
        deadline = time.time() + 120
        while time.time() < deadline and not found:
            time.sleep(1)
            try:
                found = [r for r in _query(base, "ternpool_rows_done_total") if float(r["value"][1]) > 0]
            except OSError:
                continue  # not ready yet
        assert found, "Prometheus never saw ternpool_rows_done_total"
        labels = found[0]["metric"]
        assert labels["job_id"] == handle.job_id and labels["job"] == "ternpool"  # job is the scrape job's
        assert 0 < float(found[0]["value"][1]) <= 300
        total = _query(base, "ternpool_rows_total")
        assert float(total[0]["value"][1]) == 300
        assert _query(base, 'ternpool_kv_slots{job_id="%s"}' % handle.job_id)[0]["value"][1] == "4"
        summary = handle.wait(timeout=600)
        assert summary.state == "finished"
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        if not handle._done.is_set():
            handle.cancel()
            handle.wait(timeout=120)
