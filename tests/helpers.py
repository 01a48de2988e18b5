"""Helpers that several test modules share, written once: the command line, waiting for a state,
snapshots of a directory, read-only arrays, thread counts and assembly for kernels, prompt files and the job
planned on them, and edits of a model directory.

Imported as `helpers` (pytest puts tests/ on sys.path for tests/conftest.py). Fixtures live in
tests/conftest.py; workers with injected faults in tests/cluster/faulty_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ternpool.engine.safetensors_io import TensorSpec, read_header, write_safetensors
from ternpool.jobs import JobSpec, open_inputs, plan_shards

# -- processes and time ---------------------------------------------------------------------------

CLI = (sys.executable, "-m", "ternpool.cluster.cli")  # `ternpool` of this interpreter


def run_cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`ternpool ARGS` in a child process; its output captured as text."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 0.2 s; AssertionError naming `what` when it is still false after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def completed_shards(out: Path) -> int:
    """Shards that OUT/_manifest.json records as completed (0 before it exists)."""
    manifest = Path(out) / "_manifest.json"
    return len(json.loads(manifest.read_text())["completed"]) if manifest.exists() else 0


# -- files ------------------------------------------------------------------------------------------

def snapshot(path: Path) -> dict | None:
    """Names and bytes of everything under `path` (None when it does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def same_stat_write(path: Path, data: bytes) -> None:
    """Replace a file's bytes keeping its size and mtime (what a name/size/mtime key cannot see)."""
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only copy, as arrays from the Ray object store or an mmap are."""
    a = a.copy()
    a.setflags(write=False)
    return a


def assert_same_with_any_thread_count(kernel: Callable, *args) -> None:
    """kernel(*args) gives the same array with one Numba thread as with all of them."""
    import numba

    from ternpool.kernels import set_threads

    before = numba.get_num_threads()
    try:
        set_threads(1)
        one = kernel(*args)
        set_threads(None)
        assert np.array_equal(one, kernel(*args))
    finally:
        numba.set_num_threads(before)


def assembly(module, cpu: str) -> str:
    """The x86-64 assembly of a bare llvmlite `ir.Module` compiled for the named CPU through LLVM's
    -O3 pipeline (what the asm tests read, whatever CPU runs them)."""
    from llvmlite import binding

    module.triple = "x86_64-unknown-linux-gnu"
    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    machine = binding.Target.from_triple(module.triple).create_target_machine(cpu=cpu, opt=3)
    llmod = binding.parse_assembly(str(module))
    llmod.verify()
    passes = binding.create_pass_builder(machine, binding.create_pipeline_tuning_options(speed_level=3))
    passes.getModulePassManager().run(llmod, passes)
    return machine.emit_assembly(llmod)


# -- jobs -------------------------------------------------------------------------------------------

def assert_exact_under_isa(isa: str, script: str, tmp_path: Path) -> None:
    """Run `script` (exact kernel checks that print "exact with <ISA>") in a new process with the
    instruction set forced by TERNPOOL_ISA and its own Numba cache, and assert it passed. Skips, naming
    the missing CPU features, where this machine cannot run that instruction set."""
    import pytest

    from ternpool.kernels.isa import missing_features

    if missing_features(isa):
        pytest.skip(f"{isa} needs CPU features this machine lacks: {', '.join(missing_features(isa))}")
    env = dict(os.environ, TERNPOOL_ISA=isa, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"exact with {isa}" in r.stdout, r.stdout + r.stderr


def write_prompts(path: Path, prompts: int | list, *, row_group_size: int | None = None, **columns) -> Path:
    """A Parquet file of a `prompt` column (the list given, or "story 0", "story 1", ... when a count)
    followed by `columns`; returns its path."""
    if isinstance(prompts, int):
        prompts = [f"story {i}" for i in range(prompts)]
    pq.write_table(pa.table({"prompt": prompts, **columns}), path, row_group_size=row_group_size)
    return path


def make_job(tmp_path: Path, rows: int = 10, *, src: Path | None = None, row_group_size: int | None = None,
             inputs: Path | None = None, out: Path | None = None, **spec_kwargs):
    """A prompts file of `rows` rows "p0", "p1", ... at `src` (default tmp_path/in/a.parquet; written
    once, so that a second call plans the same file) and the job that reads `inputs` (default: the
    folder of the default src, else src) into `out` (default tmp_path/out), with model "model" and
    shard_rows 4 unless given. Returns (JobSpec, inputs, shards)."""
    if src is None:
        src = tmp_path / "in" / "a.parquet"
        inputs = inputs or src.parent
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        write_prompts(src, [f"p{i}" for i in range(rows)], row_group_size=row_group_size)
    spec = JobSpec(str(inputs or src), str(out or tmp_path / "out"), "model", **{"shard_rows": 4, **spec_kwargs})
    source = open_inputs(spec.inputs)
    return spec, source, plan_shards(source, spec.shard_rows)


# -- model directories ------------------------------------------------------------------------------

# 2B4T's chat template, plus the check real templates make: an unknown role raises
RAISING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def edit_json(path: Path, _section: str | None = None, **changes) -> None:
    """Change keys of a JSON file (or of its `_section` object); a None value removes the key."""
    data = json.loads(path.read_text())
    target = data[_section] if _section else data
    for k, v in changes.items():
        if v is None:
            target.pop(k, None)
        else:
            target[k] = v
    path.write_text(json.dumps(data))


def rewrite_safetensors(model_dir: Path, drop=(), replace: dict | None = None, add: dict | None = None) -> None:
    """Rewrite model_dir/model.safetensors without the tensors `drop`, with `replace` and `add`
    ({name: (dtype, array)}) applied."""
    file = model_dir / "model.safetensors"
    arrays = {n: (i.dtype, np.array(i.load())) for n, i in read_header(file).items() if n not in drop}
    arrays.update(replace or {})
    arrays.update(add or {})
    specs = [TensorSpec(n, d, tuple(a.shape)) for n, (d, a) in arrays.items()]
    write_safetensors(file.with_name("new.safetensors"), specs, lambda s: arrays[s.name][1])
    file.with_name("new.safetensors").replace(file)


def run_one_shard(tmp_path: Path, columns, engine, **spec_kwargs):
    """A job over one shard, leased and completed through a real Coordinator with `engine`: the input is
    a Parquet file written from `columns` (a dict), or the input file `columns` names. Every row is
    generated in one batch; rows that fail to convert are failed results. Returns (coordinator, results in
    row order, the JobSpec)."""
    from ternpool.cluster.coordinator import Coordinator
    from ternpool.engine.requests import Result
    from ternpool.jobs import Manifest, to_requests

    src = columns
    if isinstance(columns, dict):
        src = tmp_path / "p.parquet"
        pq.write_table(pa.table(columns), src)
    spec = JobSpec(str(src), str(tmp_path / "out"), "model", shard_rows=1 << 20, **spec_kwargs)
    inputs = open_inputs(spec.inputs)
    plan = plan_shards(inputs, spec.shard_rows)
    coord = Coordinator(spec, inputs, plan, Manifest.open(spec.output, spec, inputs, plan, {"m": 1}), 2)
    coord.register("w", "node-a")
    key, table = coord.lease("w")
    rows = to_requests(table, spec, inputs.text_column)
    generated = iter(engine.generate([rr.request for rr in rows if rr.request is not None]))
    results = [Result.failed(rr.row_index, rr.error) if rr.request is None else next(generated) for rr in rows]
    assert coord.complete("w", key, results)
    return coord, results, spec
