"""What a user's terminal or log gets from a job: our lines, not Ray's notices, prefixes or colour codes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import CLI, write_prompts

pytestmark = pytest.mark.cluster

RAY_NOISE = ("\x1b[", "Token authentication", "(raylet)", "pid=", "View the dashboard", "Started a local Ray")


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_AUTH_MODE", None)  # unset, as for most users: Ray 2.60 then announces token auth
    env.pop("RAY_COLOR_PREFIX", None)
    return env


def test_submit_prints_our_lines_only(tmp_path, tiny_model):
    src = write_prompts(tmp_path / "p.parquet", 20)
    r = subprocess.run([*CLI, "submit", str(src), "-m", tiny_model,
                        "-o", str(tmp_path / "out"), "--max-tokens", "4", "--metrics-port", "0"],
                       capture_output=True, text=True, env=_env(), timeout=600)  # stderr is not a TTY
    both = r.stdout + r.stderr
    assert r.returncode == 0, both
    assert "finished; 20 rows, 0 failed;" in r.stdout, both
    assert [n for n in RAY_NOISE if n in both] == [], both


def test_a_crashing_worker_is_reported_by_the_driver_not_by_ray(tmp_path, tiny_model):
    src = write_prompts(tmp_path / "p.parquet", 20)
    script = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from faulty_worker import faulty
        from ternpool.cluster.driver import PoolConfig, submit
        from ternpool.engine import EngineConfig, SamplingParams
        h = submit({str(src)!r}, {tiny_model!r}, {str(tmp_path / "out")!r}, sampling=SamplingParams(max_tokens=4),
                   shard_rows=10, max_retries=0,
                   pool=PoolConfig(engine=EngineConfig(slots=2, threads=1), metrics_port=0),
                   worker_cls=faulty(exit_on_prompt="story 3"))
        s = h.wait(600)
        print("state", s.state, "rows", s.rows, "failed", s.failed_rows)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600)
    both = r.stdout + r.stderr
    assert r.returncode == 0, both
    assert "state finished rows 20" in r.stdout, both
    # the worker that died on "story 3" is reported once per loss, with Ray's reason, by our driver
    assert "WARNING ternpool.cluster.driver: worker w-" in r.stderr and "was lost (ActorDiedError: " in r.stderr, both
    assert [n for n in RAY_NOISE if n in both] == [], both


def test_connecting_twice_in_one_process_prints_nothing(capfd, monkeypatch):
    import ray

    from ternpool.cluster.ray_env import connect

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    for _ in range(2):
        assert connect(None)
        ray.shutdown()
    out, err = capfd.readouterr()
    assert out + err == "", out + err
