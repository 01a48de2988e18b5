"""Numba flags and thread control for every kernel, in one place.

Kernels decorate with `njit(**NJIT)` / `njit(**NJIT_PARALLEL)` from here so
that caching and fast-math choices are made once. Integer kernels are exact
whatever the flags; float kernels keep IEEE semantics (no fast-math) so that
results do not depend on how many tokens share a batch.

Compiled kernels are cached on disk (so a second process starts without
recompiling) in `kernel_cache_dir()`, under the user's ternpool cache, never
inside the installed package: a `__pycache__` left there by a non-editable
install outlives `pip uninstall` and shadows a later editable install.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import tempfile
from pathlib import Path

import numba
from llvmlite import binding as _llvm

from .isa import ISAS, host_isa, usable_isas

log = logging.getLogger(__name__)


# Numba's default threading layer on Linux is OpenMP (GNU libgomp), whose threads spin for a while
# after every parallel kernel waiting for the next one. A decode step calls ~150 kernels; on a node
# where another process wants the cores, threads that spin long take its time slices and the step waits
# for a descheduled thread at every kernel (2-thread decode of the 2b4t model fell to 0.14 tokens/s on
# a shared 2-core machine, against 1.16 with passive waits; see README), while threads that sleep at
# once must be woken at every kernel (~12 ms of a 80 ms decode step on an idle node). So threads spin
# for a short while and then sleep: GOMP_SPINCOUNT=SPIN_COUNT (libgomp's spins, ~100 a microsecond,
# cover the gap between two kernels of a step; libgomp lets it override the policy) and
# OMP_WAIT_POLICY=passive (for other OpenMP runtimes). Set here, before Numba loads its OpenMP layer on
# the first `set_threads` or parallel kernel; if the user set either variable, both are left alone. An
# OpenMP runtime already loaded into the process keeps its own.
WAIT_POLICY = "passive"
SPIN_COUNT = "5000"  # measured: README, "The bandwidth ceiling"


def quiet_thread_waits(environ=os.environ) -> tuple[str | None, str | None]:
    """Set OMP_WAIT_POLICY and GOMP_SPINCOUNT in `environ` unless either is set; returns the two in force."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["OMP_WAIT_POLICY"], environ["GOMP_SPINCOUNT"] = WAIT_POLICY, SPIN_COUNT
    return environ.get("OMP_WAIT_POLICY"), environ.get("GOMP_SPINCOUNT")


quiet_thread_waits()


def available_threads() -> int:
    """Threads Numba may use in this process (the CPUs this process may run on)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def set_threads(n: int | None) -> int:
    """Set the Numba thread count for the calling thread; None means all available.

    `numba.set_num_threads` applies to the calling thread only: call this in the
    thread that runs the kernels.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if n is None:
        n = available_threads()
    if not 1 <= n <= limit:
        raise ValueError(f"threads must be between 1 and {limit} on this machine, got {n}")
    numba.set_num_threads(n)
    return n


# Instruction set of the SIMD kernels, a name of `isa.ISAS`: the best one the CPU has ("amx": int8
# tiles for many-token calls, else as avx512vnni; "avx10.2" and "avx512vnni": vpdpbusd on zmm, the
# former with vpdpbssd for the int8 head; "avxvnniint8" and "avxvnni": the same on ymm; "avx2":
# vpmaddubsw/vpmaddwd; "generic": plain LLVM vector code, any x86-64), or TERNPOOL_ISA (e.g. generic
# forces the portable path); then the best one this process can run (AMX needs the kernel's
# permission, see _enabled). The kernel cache is keyed by it (see kernel_cache_dir).
ISA = os.environ.get("TERNPOOL_ISA") or host_isa()
if ISA not in ISAS:
    raise ValueError(f"TERNPOOL_ISA must be one of {', '.join(map(repr, ISAS))}, got {ISA!r}")


def _enabled(name: str) -> str:
    """`name` if this process can run it (`Isa.enable`: AMX needs the kernel's permission), else the
    best other usable instruction set that it can run, with a warning saying why."""
    refused = ISAS[name].enable()
    if refused is None:
        return name
    fallback = next(other for other in usable_isas() + ["generic"] if other != name and ISAS[other].enable() is None)
    log.warning("the %s kernels cannot run in this process (%s): using %s instead", name, refused, fallback)
    return fallback


ISA = _enabled(ISA)


def cache_root() -> Path:
    """ternpool's cache directory: $TERNPOOL_CACHE_DIR, else ~/.cache/ternpool.

    Compiled kernels go under `numba/`, converted models under `native/` (engine/native.py)."""
    return Path(os.environ.get("TERNPOOL_CACHE_DIR") or Path.home() / ".cache" / "ternpool")


def kernel_cache_key() -> str:
    """Names the compiled code: ternpool version, ISA, host CPU, and a hash of every kernel source.

    Numba checks each cached function against its own source file only; a kernel also depends on
    the IR emitters and ISA strategies of other files (simd.py, isa.py, llvmir.py), on TERNPOOL_ISA
    and on the Numba version, so all of those pick a separate folder and stale code is never loaded."""
    try:
        version = importlib.metadata.version("ternpool")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree: the source hash decides
        version = "src"
    h = hashlib.sha256(f"numba {numba.__version__}\n".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        source = path.read_bytes()
        h.update(f"{path.name} {len(source)}\n".encode())
        h.update(source)
    return f"{version}-{ISA}-{_llvm.get_host_cpu_name()}-{h.hexdigest()[:16]}"


def kernel_cache_dir() -> Path:
    """Where Numba caches ternpool's kernels: $NUMBA_CACHE_DIR if the user set it, else
    `cache_root()/numba/<kernel_cache_key()>`."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    return cache_root() / "numba" / kernel_cache_key()


def _writable_cache_dir() -> Path | None:
    path = kernel_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        # Numba would fall back to the package's own __pycache__: compile in memory instead
        log.warning("kernel cache %s is not writable (%s): kernels are compiled in every process; set "
                    "TERNPOOL_CACHE_DIR to a writable directory to cache them", path, e)
        return None
    return path


KERNEL_CACHE_DIR = _writable_cache_dir()

# cache=True keeps compiled kernels in KERNEL_CACHE_DIR, so a second process starts without recompiling.
NJIT = dict(cache=KERNEL_CACHE_DIR is not None, nogil=True)
NJIT_PARALLEL = dict(NJIT, parallel=True)
# Float reductions (dot products) may be vectorized by re-association. Each
# output element is still computed by the same instruction sequence whatever
# the batch size, so results stay batch-invariant and deterministic.
NJIT_FAST = dict(NJIT, fastmath=True)
NJIT_PARALLEL_FAST = dict(NJIT_PARALLEL, fastmath=True)


def njit(**flags):
    """`numba.njit(**flags)` whose on-disk cache goes to KERNEL_CACHE_DIR.

    Numba picks a function's cache directory when it is decorated, from `numba.config.CACHE_DIR`;
    it is set only for the decoration, so other Numba code in the process keeps its own."""
    def decorate(fn):
        if not flags.get("cache"):
            return numba.njit(**flags)(fn)
        saved = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(KERNEL_CACHE_DIR)
        try:
            return numba.njit(**flags)(fn)
        finally:
            numba.config.CACHE_DIR = saved
    return decorate
