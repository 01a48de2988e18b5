"""Numba flags and thread control for every kernel, in one place.

Kernels import `NJIT` / `NJIT_PARALLEL` from here so that caching and
fast-math choices are made once. Integer kernels are exact whatever the
flags; float kernels keep IEEE semantics (no fast-math) so that results do
not depend on how many tokens share a batch.
"""

from __future__ import annotations

import os

import numba
from llvmlite import binding as _llvm

# cache=True writes compiled kernels next to the sources (or NUMBA_CACHE_DIR),
# so a second process starts without recompiling.
NJIT = dict(cache=True, nogil=True)
NJIT_PARALLEL = dict(NJIT, parallel=True)


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

# Float reductions (dot products) may be vectorized by re-association. Each
# output element is still computed by the same instruction sequence whatever
# the batch size, so results stay batch-invariant and deterministic.
NJIT_PARALLEL_FAST = dict(NJIT_PARALLEL, fastmath=True)


def _host_isa() -> str:
    try:
        features = _llvm.get_host_cpu_features()
    except RuntimeError:  # pragma: no cover - unknown host
        return "generic"
    return "avx2" if features.get("avx2") else "generic"


# Instruction set of the SIMD kernels: "avx2" (vpmaddubsw/vpmaddwd) when the CPU has it, else
# "generic" (plain LLVM vector code, any x86-64). TERNPOOL_ISA=generic forces the portable path;
# use it with a fresh NUMBA_CACHE_DIR, as Numba's cache does not know about this switch.
ISA = os.environ.get("TERNPOOL_ISA") or _host_isa()
if ISA not in ("avx2", "generic"):
    raise ValueError(f"TERNPOOL_ISA must be 'avx2' or 'generic', got {ISA!r}")
