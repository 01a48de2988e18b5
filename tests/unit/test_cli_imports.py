"""`ternpool status`, `cancel` and every command's `--help` load neither Numba, the kernels, Ray, torch nor
transformers: they work from any shell at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.jobs import JobSpec, Manifest, open_inputs, plan_shards

from helpers import CLI

pytestmark = pytest.mark.unit

HEAVY = ("numba", "ray", "ternpool.kernels", "torch", "transformers")


def _loaded_after(argv: list[str]) -> list[str]:
    code = (
        "import sys\n"
        "from ternpool.cluster.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('MODULES=' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}\n"
        f"                                    or any(m == h or m.startswith(h + '.') for h in {HEAVY!r}))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("MODULES=")][-1]
    return [m for m in line[len("MODULES="):].split(",") if m]


@pytest.fixture(scope="module")
def job_output(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("job")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp / "p.parquet")
    spec = JobSpec(str(tmp / "p.parquet"), str(tmp / "out"), "model", shard_rows=2)
    inputs = open_inputs(spec.inputs)
    plan = plan_shards(inputs, 2)
    manifest = Manifest.open(spec.output, spec, inputs, plan, {"name": "m"})
    manifest.record(0, 2, 0)
    return spec.output


def _commands(parser=None, prefix=()) -> list[list[str]]:
    """Every command and subcommand of the parser, `ternpool` itself first: [[], ["make-model"], ...,
    ["bench"], ["bench", "kernels"], ...]."""
    import argparse

    from ternpool.cluster.cli import build_parser

    parser = parser or build_parser()
    found = [list(prefix)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


HELP = [[*command, "--help"] for command in _commands()]


def test_every_command_has_its_help_checked():
    names = {" ".join(argv[:-1]) for argv in HELP}
    assert {"", "submit", "status", "cancel", "demo", "generate", "make-model", "convert", "bench",
            "bench kernels", "bench cluster"} <= names, names


@pytest.mark.parametrize("argv", [["status", "OUT"], ["status", "OUT", "--json"], ["cancel", "OUT"], *HELP],
                         ids=lambda argv: " ".join(argv))
def test_light_commands_import_nothing_heavy(job_output, argv):
    argv = [job_output if a == "OUT" else a for a in argv]
    assert _loaded_after(argv) == []


def test_status_and_cancel_still_work_from_a_plain_shell(job_output, tmp_path):
    run = subprocess.run([*CLI, "status", job_output, "--json"],
                         capture_output=True, text=True, timeout=120)
    s = json.loads(run.stdout)
    assert (s["rows_done"], s["rows_total"], s["shards_done"]) == (2, 3, 1)
    run = subprocess.run([*CLI, "cancel", job_output],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "cancel requested" in run.stdout
    from ternpool.jobs import cancel_requested

    assert cancel_requested(job_output)


def test_engine_names_are_still_importable():
    code = ("import sys; import ternpool.engine.requests; assert 'ternpool.engine.engine' not in sys.modules; "
            "from ternpool.engine import Engine, ModelConfig, ModelFormatError, Request, Result, SamplingParams; "
            "import ternpool.engine as e; assert Engine.__name__ == 'Engine' and 'Engine' in dir(e)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
