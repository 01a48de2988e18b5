"""Where the time of a small job on the embedded cluster goes: one tiny job, timed phase by phase.

    python tests/tools/startup_time.py --repeat 3

Each run times, in seconds from its start, through the Python API: ray.init (ternpool's
`connect`), the coordinator actor ready (`submit` returns once its metrics endpoint answers), the
worker actor ready (Engine.load and the warm-up generation done: it has registered), the first
shard written, the job's end, and ray.shutdown. Then the same job as `ternpool submit` in a
subprocess: its whole wall time, and the time from its summary line to its exit. Medians of
`--repeat` runs are printed. The tool uses only `connect(None)`, `submit` and the CLI, so it runs
unchanged against an older checkout of `cluster/` (before/after comparisons).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def _count(stats, name: str):
    """A count of `JobHandle.progress()`: a JobStats, or a dict in checkouts before it was typed."""
    return stats[name] if isinstance(stats, dict) else getattr(stats, name)


def _api_phases(model: str, src: Path, out: Path) -> dict[str, float]:
    import ray

    from ternpool.cluster.driver import PoolConfig, submit
    from ternpool.engine import EngineConfig, SamplingParams
    from ternpool.cluster.ray_env import connect

    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    connect(None)  # the job below joins this cluster instead of starting its own
    marks["ray.init"] = time.perf_counter() - t0
    try:
        handle = submit(str(src), model, str(out), sampling=SamplingParams(max_tokens=8), shard_rows=10,
                        pool=PoolConfig(engine=EngineConfig(slots=4), metrics_port=0))
        marks["coordinator ready"] = time.perf_counter() - t0
        while not handle._done.is_set():
            try:
                s = handle.progress()
            except Exception:  # the job is ending: its coordinator is gone
                break
            now = time.perf_counter() - t0
            if _count(s, "active_workers") and "worker ready" not in marks:
                marks["worker ready"] = now
            if _count(s, "rows_done") and "first shard" not in marks:
                marks["first shard"] = now
            time.sleep(0.02)
        summary = handle.wait()
        marks["job end"] = time.perf_counter() - t0
        assert summary.state == "finished", summary
    finally:
        ray.shutdown()
    marks["shutdown"] = time.perf_counter() - t0
    return marks


def _cli_phases(model: str, src: Path, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "ternpool.cluster.cli", "submit", str(src), "-m", model, "-o", str(out),
           "--max-tokens", "8", "--shard-rows", "10", "--slots", "4", "--metrics-port", "0", "--no-progress"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary_at = None
    for line in p.stdout:
        if ": finished;" in line:
            summary_at = time.perf_counter() - t0
    if p.wait() != 0 or summary_at is None:
        raise RuntimeError(f"ternpool submit failed (exit {p.returncode})")
    wall = time.perf_counter() - t0
    return {"CLI summary line": summary_at, "CLI exit": wall, "CLI summary to exit": wall - summary_at}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1, help="runs; the table shows medians")
    p.add_argument("--rows", type=int, default=40)
    args = p.parse_args()
    from ternpool.engine.modelgen import make_model

    work = Path(tempfile.mkdtemp(prefix="ternpool-startup-"))
    model = str(make_model(work / "model", "tiny"))
    src = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": [f"story {i}" for i in range(args.rows)]}), src)
    runs = []
    for i in range(args.repeat):
        marks = _api_phases(model, src, work / f"api-{i}")
        marks.update(_cli_phases(model, src, work / f"cli-{i}"))
        runs.append(marks)
    print(f"{'phase':<22}{'s from start':>14}   (median of {args.repeat})")
    for name in runs[0]:
        print(f"{name:<22}{statistics.median(r[name] for r in runs if name in r):>14.2f}")


if __name__ == "__main__":
    main()
