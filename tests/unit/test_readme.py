"""Every example of README.md is parsed, and run where it can be, or listed below with the reason.

The commands are found, not listed: every line of README's shell code blocks (`\\` continuations
joined, `&&` chains split) and every Python block. A `ternpool ...` command is split into words by
bash itself and parsed by the real parser; then it runs for real, in a sandbox directory where
README's paths exist (`path/to/...` is a tiny generated model, `models/...` is made by README's own
`make-model`/`convert` commands, `out/` holds a finished job made without Ray), unless a rule of
SKIP_TERNPOOL says why it cannot run here. Any other program must be named in OTHER_PROGRAMS.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
readme = sys.modules.setdefault("readme_commands", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(readme)
TEXT = (ROOT / "README.md").read_text()
JOB_ROWS = 8  # rows of the sandbox's finished job in out/


def _opt(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else None


# (rule, reason): a README `ternpool` command matching a rule is parsed but not run here.
SKIP_TERNPOOL = [
    (lambda argv, ns: any(a.startswith(("s3://", "gs://")) for a in argv),
     "reads or writes object storage, which these machines cannot reach"),
    (lambda argv, ns: "--address" in argv, "joins a running multi-node Ray cluster"),
    (lambda argv, ns: any("100b" in a for a in argv),
     "the 100B model: 25 GB on disk and hours here (tests/slow/test_100b.py runs it)"),
    (lambda argv, ns: getattr(ns, "shape", "tiny") != "tiny" or any(a.rstrip("/") == "models/2b4t" for a in argv),
     "a full-size shape: minutes and GBs (tests/slow runs 2b4t)"),
    (lambda argv, ns: ns.command in ("submit", "demo"),
     "starts an embedded Ray cluster: tests/cluster/test_submit.py runs jobs; .ci/run runs `ternpool demo` "
     "and a `messages` submit from README's plain install"),
    (lambda argv, ns: ns.command == "cancel",
     "stops a running job (Ray): tests/cluster/test_submit.py cancels one from another shell"),
    (lambda argv, ns: ns.command == "bench",
     "a benchmark (minutes at full size): tests/unit/test_bench_commands.py runs each one on tiny shapes"),
]

# Programs other than ternpool that README's shell blocks run, and who runs them.
OTHER_PROGRAMS = {
    "pip": "installs: .ci/run runs README's Quick start as written, in a fresh virtual environment",
    "python": "the test suite: .ci/run runs the Quick start's test command",
    "prometheus": "tests/cluster/test_metrics.py starts a real Prometheus scraping a job",
    "ray": "starts Ray on the nodes of a real cluster (several machines)",
}

# A Python block containing one of these is parsed and its imports run, but not the block.
SKIP_PYTHON = {
    "submit(": "starts an embedded Ray cluster: tests/cluster/test_submit.py runs submit() and the handle",
    "client.batches.create(": "OpenAI's own Batch API (the 'Moving from OpenAI Batch' comparison), not reachable here",
}


def _split_chain(command: str) -> list[str]:
    """`a && b; c  # note` -> [a, b, c]: splits at `&&`, `||`, `;` and drops the comment, outside quotes."""
    parts, current, quote, i = [], "", None, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (not current or current[-1].isspace()):
            break
        elif command.startswith(("&&", "||"), i) or ch == ";":
            parts.append(current)
            current, i = "", i + (1 if ch == ";" else 2)
            continue
        current += ch
        i += 1
    return [p.strip() for p in [*parts, current] if p.strip()]


def _examples() -> list[tuple[int, str]]:
    """(README line of the block, one simple command) for every shell block."""
    return [(b.line, part) for b in readme.shell_blocks(TEXT) for c in readme.commands(b.text) for part in _split_chain(c)]


def _argv(command: str) -> list[str]:
    """The arguments bash passes to `ternpool` for this command line (quotes, $'...', comments)."""
    script = 'ternpool() { printf "%s\\0" "$@"; }\n' + command
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, timeout=30).stdout
    return out.decode().split("\0")[:-1]


def _program(command: str) -> str:
    """The program a simple command runs (after `NAME=value` environment assignments)."""
    return next(w for w in command.split() + [""] if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w))


EXAMPLES = _examples()
TERNPOOL = [(line, c) for line, c in EXAMPLES if _program(c) == "ternpool"]
PYTHON_BLOCKS = [b for b in readme.code_blocks(TEXT) if b.lang == "python"]


def _parse(argv: list[str]):
    from ternpool.cluster.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"ternpool's parser rejects README's example {shlex.join(['ternpool', *argv])}: {err.getvalue()}")


def _skip_reason(argv, ns) -> str | None:
    return next((reason for rule, reason in SKIP_TERNPOOL if rule(argv, ns)), None)


# -- the sandbox where README's paths exist -------------------------------------------------------------


class Sandbox:
    def __init__(self, root: Path, tiny: str):
        self.root, self.tiny = root, tiny
        self.done: dict[str, tuple[int, str]] = {}  # command -> (exit code, output)
        # outputs of README's commands: `models/x` -> the command that makes it
        self.makers = {}
        for _, c in TERNPOOL:
            out = _opt(_argv(c), "--out")
            if out:
                self.makers[os.path.normpath(out)] = c

    @contextlib.contextmanager
    def cwd(self):
        before = os.getcwd()
        os.chdir(self.root)
        try:
            yield
        finally:
            os.chdir(before)

    def provide(self, words: list[str]) -> None:
        """Make every README path these words name: placeholders link to the tiny model, README's own
        outputs are made by running the README command that makes them."""
        for w in words:
            path = os.path.normpath(w)
            if w.startswith("path/to/") and not (self.root / path).exists():
                (self.root / path).parent.mkdir(parents=True, exist_ok=True)
                (self.root / path).symlink_to(self.tiny)
            elif path in self.makers and not (self.root / path).exists():
                code, out = self.run(self.makers[path])
                assert code == 0, f"README's {self.makers[path]!r} (which makes {path}) failed: {out}"

    def run(self, command: str) -> tuple[int, str]:
        if command not in self.done:
            from ternpool.cluster.cli import main

            argv = _argv(command)
            made = _opt(argv, "--out")
            self.provide([a for a in argv if not a.startswith("-") and a != made])
            out, err = io.StringIO(), io.StringIO()
            with self.cwd(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            # stdout, and stderr (what went wrong) when the command failed
            self.done[command] = (code, out.getvalue() if code == 0 else out.getvalue() + err.getvalue())
        return self.done[command]


def _finished_job(root: Path, model: str) -> None:
    """prompts.parquet and, in out/, a finished job: the coordinator's own writing path, fed by the
    engine in this process (what a worker does, without Ray)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ternpool.cluster.coordinator import DONE, Coordinator
    from ternpool.cluster.driver import prepare
    from ternpool.engine import Engine
    from ternpool.engine.requests import Request, SamplingParams
    from ternpool.jobs import JobSpec, to_requests

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(JOB_ROWS)],
                             "prompt": [f"Tell me about item {i}" for i in range(JOB_ROWS)]}),
                   root / "prompts.parquet", row_group_size=4)
    plan = prepare(JobSpec(inputs=str(root / "prompts.parquet"), output=str(root / "out"), model=model,
                           sampling=SamplingParams(max_tokens=8), shard_rows=4))
    coord = Coordinator(plan.spec, plan.inputs, plan.shards, plan.manifest, 0)
    coord.register("readme", "local")
    engine = Engine.load(model, slots=4, max_context=256)
    while (lease := coord.lease("readme")) != DONE:
        key, table = lease
        rows = list(to_requests(table, plan.spec, plan.inputs.text_column))
        requests = [Request(rr.row_index, rr.request.prompt, rr.request.messages, rr.request.params,
                            rr.request.prompt_token_ids) for rr in rows]
        results = [replace(r, prompt_token_ids=()) for r in engine.generate(requests)]
        assert coord.complete("readme", key, results)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model) -> Sandbox:
    root = tmp_path_factory.mktemp("readme-sandbox")
    _finished_job(root, tiny_model)
    (root / "person.schema.json").write_text(json.dumps({  # README's structured-output example
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"]}))
    return Sandbox(root, tiny_model)


# -- shell examples -------------------------------------------------------------------------------------


def test_readme_has_examples_to_check():
    assert len(TERNPOOL) >= 10 and len(PYTHON_BLOCKS) >= 3, (TERNPOOL, PYTHON_BLOCKS)


@pytest.mark.parametrize("line,command", EXAMPLES, ids=[f"L{line}:{c[:60]}" for line, c in EXAMPLES])
def test_every_shell_example_is_a_known_program(line, command):
    program = _program(command)
    assert program == "ternpool" or program in OTHER_PROGRAMS, (
        f"README.md:{line}: `{command}` runs {program!r}: run it in a test, or add it to OTHER_PROGRAMS with "
        "who runs it")


@pytest.mark.parametrize("line,command", TERNPOOL, ids=[f"L{line}:{c[9:70]}" for line, c in TERNPOOL])
def test_ternpool_example(line, command, sandbox):
    argv = _argv(command)
    ns = _parse(argv)
    for stop in getattr(ns, "stop", None) or ():
        assert "\\n" not in stop and "\\t" not in stop, (
            f"README.md:{line}: bash passes --stop {stop!r} (a backslash, not a newline): write $'\\n'")
    reason = _skip_reason(argv, ns)
    if reason:
        pytest.skip(f"README.md:{line}: not run here: {reason}")
    code, out = sandbox.run(command)
    assert code == 0, f"README.md:{line}: `{command}` exited {code}: {out}"
    if getattr(ns, "out", None):
        assert (sandbox.root / ns.out).is_dir(), f"README.md:{line}: `{command}` made no {ns.out}"
    if ns.command == "generate":
        assert out.endswith("\n"), out  # the text, then print()'s newline
        text = out[:-1]
        if ns.stop:
            _check_stop(command, argv, ns, text, sandbox)
    if ns.command == "status" and ns.json:
        s = json.loads(out)
        assert (s["state"], s["rows_done"]) == ("finished", JOB_ROWS), s
    elif ns.command == "status":
        assert f": finished; {JOB_ROWS}/{JOB_ROWS} rows" in out, out


def _check_stop(command, argv, ns, text, sandbox):
    """The text ends before the first stop string: it equals the same generation without --stop, cut there."""
    free = [a for i, a in enumerate(argv) if a != "--stop" and (i == 0 or argv[i - 1] != "--stop")]
    code, out = sandbox.run(shlex.join(["ternpool", *free, "--json"]))
    assert code == 0, out
    full = json.loads(out)["text"]
    cut = min((full.index(s) for s in ns.stop if s in full), default=len(full))
    assert text == full[:cut], (command, text, full)
    assert not any(s in text for s in ns.stop), (command, text)


def test_stop_example_passes_a_real_newline():
    """README's `--stop` example, split into words by bash, passes one newline character."""
    stops = [_opt(_argv(c), "--stop") for _, c in TERNPOOL if "--stop" in c]
    assert stops and all(s == "\n" for s in stops), stops


def test_skipped_examples_say_why():
    """Listed so that a reader sees at once what README shows but this file does not run."""
    skipped = {c: _skip_reason(_argv(c), _parse(_argv(c))) for _, c in TERNPOOL}
    run = [c for c, reason in skipped.items() if reason is None]
    assert any("make-model --shape tiny" in c for c in run) and any(" convert " in c for c in run)
    assert any(" generate " in c for c in run) and any(" status " in c for c in run)
    assert all(isinstance(r, str) and len(r) > 20 for r in skipped.values() if r is not None)


# -- Python examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"L{b.line}" for b in PYTHON_BLOCKS])
def test_python_example(block, sandbox):
    tree = ast.parse(block.text, f"README.md:{block.line}")
    imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
    scope: dict = {}
    exec(compile(imports, f"README.md:{block.line}", "exec"), scope)  # every imported name exists
    reason = next((why for marker, why in SKIP_PYTHON.items() if marker in block.text), None)
    if reason:
        pytest.skip(f"README.md:{block.line}: imports checked, not run here: {reason}")
    sandbox.provide(re.findall(r"""["']([^"'\s]+)["']""", block.text))
    with sandbox.cwd(), contextlib.redirect_stdout(io.StringIO()):
        exec(compile(tree, f"README.md:{block.line}", "exec"), scope)
    if "table" in scope:  # read_output: the job's rows, ordered like the input
        assert scope["table"].column("row_index").to_pylist() == list(range(JOB_ROWS))
    if "results" in scope:  # the engine: one result per request, in order, none failed
        results = scope["results"]
        assert [r.key for r in results] == [r.key for r in scope["requests"]]
        assert all(r.error is None and r.finish_reason in ("stop", "length") for r in results), results


def test_submit_example_matches_the_api():
    """The Ray example is not run here; its call and the names it uses must still exist."""
    import inspect

    import ternpool.cluster
    from ternpool.cluster import submit
    from ternpool.cluster.driver import JobHandle, JobSummary

    (block,) = [b for b in PYTHON_BLOCKS if "submit(" in b.text]
    call = next(n for n in ast.walk(ast.parse(block.text)) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "submit")
    args = [ast.literal_eval(a) for a in call.args]
    # the keywords' values are built with the names ternpool.cluster exports (PoolConfig, EngineConfig, ...)
    names = {name: getattr(ternpool.cluster, name) for name in ternpool.cluster.__all__}
    kwargs = {k.arg: eval(compile(ast.Expression(k.value), "README.md", "eval"), names) for k in call.keywords}
    inspect.signature(submit).bind(*args, **kwargs)
    for name in re.findall(r"handle\.(\w+)\(", block.text):
        assert callable(getattr(JobHandle, name, None)), name
    for name in re.findall(r"summary\.(\w+)", block.text):
        assert name in JobSummary.__dataclass_fields__ or hasattr(JobSummary, name), name


# -- .ci/run runs the Quick start ----------------------------------------------------------------------


def test_ci_runs_the_quickstart_as_written():
    """CI reads the Quick start from README (so they cannot drift) and runs each command; the first is a
    plain install (no extras) and the demo, the last the test command."""
    commands = readme.quickstart(TEXT)
    assert len(commands) == 2, commands
    assert commands[0] == "pip install . && ternpool demo"
    assert "pip install -e '.[test]'" in commands[-1] and 'python -m pytest -m "not slow"' in commands[-1]
    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_commands.py"), "quickstart"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed == commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python .ci/readme_commands.py quickstart' in ci
    assert 'run_readme "${COMMANDS[0]}"' in ci and 'for cmd in "${COMMANDS[@]:1}"' in ci
    assert ci.index('run_readme "${COMMANDS[0]}"') < ci.index("ternpool submit") < ci.index('"${COMMANDS[@]:1}"')
    assert "python -m venv .ci-venv" in ci and "source .ci-venv/bin/activate" in ci
