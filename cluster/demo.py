"""The job of `ternpool demo`: a tiny random model and example prompts in one directory, made once,
and the plan of a job over them (rerunning resumes it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ternpool.engine.modelgen import make_model
from ternpool.engine.requests import SamplingParams
from ternpool.jobs import JobSpec
from ternpool.jobs.demo import write_demo_prompts

from .driver import Plan, prepare


def prepare_demo(root: str | Path, rows: int = 200, note: Callable[[str], None] = lambda _: None) -> Plan:
    """The plan of the demo job in `root`: `root/model` (a tiny random model) and `root/prompts.parquet`
    (`rows` example prompts) are made when missing, each made file reported through `note`; the job
    writes `root/output`, 32 tokens a row in shards of 32 rows."""
    root = Path(root)
    model = root / "model"
    if not (model / "config.json").exists():
        make_model(model, "tiny")
        note(f"made a tiny random model in {model}")
    prompts = root / "prompts.parquet"
    if not prompts.exists():
        write_demo_prompts(prompts, rows=rows)
        note(f"wrote {rows} example prompts to {prompts}")
    return prepare(JobSpec(inputs=str(prompts), output=str(root / "output"), model=str(model),
                           sampling=SamplingParams(max_tokens=32), shard_rows=32))
