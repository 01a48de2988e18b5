"""Memory read bandwidth measured the way decode reads its weights: every Numba thread streaming its
own contiguous part of one buffer far larger than the last-level cache, in 32-byte vector loads
summed as bytes, several passes, the best one kept.

Single-stream decode reads every weight byte once per token, so bytes per token / this bandwidth is
the decode's ceiling (`engine/bench.py`). A measurement that reads slower than the kernels do (one
thread, a float64 sum whose loop is not vectorized, a buffer the cache holds) makes that ceiling
too low; the bench then says so instead of printing a fraction above 1.

`byte_sum(a)` is the kernel: the exact sum of a uint8 array, whole 128-byte blocks through an LLVM
IR intrinsic (four 32-byte loads, each widened to 16-bit lanes and added as the portable `generic`
strategy's `madd` of the bytes by ones does, widened to int32 every 64 blocks), the rest in Numba.
The portable strategy is used on every CPU on purpose: the loop is bound by memory, not by its
few instructions per 32 bytes, so every machine measures the same loop. `byte_sum_ref` is its
NumPy twin.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numba
import numpy as np
from numba import prange
from numba.extending import intrinsic

from .config import NJIT_PARALLEL, njit
from .isa import ISAS
from .llvmir import V32I8, array_data, as_i64, block_sums, hsum, i64, int32_sums, load32, splat

log = logging.getLogger(__name__)

LOADS = 4  # 32-byte loads per block, each into its own accumulator
BLOCK = 32 * LOADS  # bytes per block of the intrinsic
CHUNK = 64  # blocks added in 16-bit lanes before widening: 64 * 255 = 16320 < 32767
PART = 1 << 20  # bytes per parallel task: its int32 sum stays below 2**31 (255 * 2**23 would too)
GIB = 1 << 30


def emit_byte_sum(builder, isa, base, nblocks):
    """The int32 sum of the bytes (unsigned) at byte pointer `base`, over `nblocks` (i64) blocks of
    BLOCK bytes: each 32-byte load goes through `isa.madd` against ones (u8 x 1, 16-bit pairs)."""
    ones = splat(V32I8, 1)

    def block(idx, pairs):
        off = builder.mul(idx, i64(BLOCK))
        return [isa.madd(builder, p, load32(builder, base, builder.add(off, i64(32 * k))), ones)
                for k, p in enumerate(pairs)]

    accs = block_sums(builder, "bytes", isa, nblocks, LOADS, block, CHUNK)
    total = accs[0]
    for acc in accs[1:]:
        total = builder.add(total, acc)
    return hsum(builder, total)


@intrinsic
def _block_sum(typingctx, a, start, nblocks):
    """int32 sum of a[start : start + BLOCK * nblocks] (a: C-contiguous uint8, 1-D)."""
    def emit(context, builder, signature, args):
        base = builder.gep(array_data(context, builder, signature.args[0], args[0]), [as_i64(builder, args[1])])
        return [emit_byte_sum(builder, ISAS["generic"], base, as_i64(builder, args[2]))]

    return int32_sums((a, start, nblocks), 1, emit)


@njit(**NJIT_PARALLEL)
def _part_sums(a, part):  # pragma: no cover - compiled
    """int64 sums of a[p * part : (p + 1) * part] for every part p, one parallel task each."""
    n = a.shape[0]
    parts = (n + part - 1) // part
    out = np.zeros(parts, np.int64)
    for p in prange(parts):
        lo = p * part
        hi = min(n, lo + part)
        nb = (hi - lo) // BLOCK
        s = np.int64(_block_sum(a, lo, nb))
        for i in range(lo + nb * BLOCK, hi):
            s += a[i]
        out[p] = s
    return out


def byte_sum(a: np.ndarray) -> int:
    """The exact sum of a C-contiguous 1-D uint8 array, with every Numba thread."""
    if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"byte_sum needs a C-contiguous 1-D uint8 array, got {a.dtype} of shape {a.shape}")
    return int(_part_sums(a, PART).sum())


def byte_sum_ref(a: np.ndarray) -> int:
    """NumPy reference of `byte_sum`."""
    return int(np.asarray(a, dtype=np.uint8).sum(dtype=np.uint64))


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports for CPU 0 (bytes), 0 when it reports none."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=0)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as e:  # pragma: no cover - not Linux
        log.info("no /proc/meminfo (%s): the bandwidth buffer is not capped by free memory", e)
    return None


def buffer_bytes() -> int:
    """The default buffer: 8 x the last-level cache, at least 1 GiB, at most a quarter of the memory
    available now (but never below 1 GiB)."""
    want = max(GIB, 8 * last_level_cache_bytes())
    avail = _available_memory()
    if avail is not None and want > avail // 4:
        log.info("bandwidth buffer capped at a quarter of available memory: %.2f GiB instead of %.2f GiB",
                 max(GIB, avail // 4) / GIB, want / GIB)
        want = max(GIB, avail // 4)
    return want


def read_bandwidth(nbytes: int | None = None, passes: int = 8, threads: int | None = None) -> dict:
    """Read bandwidth with the calling thread's Numba thread count (or `threads`, for this call only):
    `byte_sum` over a buffer of `nbytes` (default `buffer_bytes()`), one untimed pass and then
    `passes` timed ones. Returns {bytes_per_s (the best pass), median_bytes_per_s, buffer_bytes,
    passes, threads, llc_bytes}. Every pass's sum is checked against the known total."""
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    nbytes = buffer_bytes() if nbytes is None else int(nbytes)
    a = np.full(nbytes, 0x5A, dtype=np.uint8)  # written once: every page is committed before timing
    expected = 0x5A * nbytes
    before = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        times = []
        for k in range(passes + 1):
            t0 = time.perf_counter()
            s = byte_sum(a)
            dt = time.perf_counter() - t0
            if s != expected:
                raise RuntimeError(f"byte_sum over {nbytes} bytes gave {s}, expected {expected}")
            if k:  # the first pass compiles or loads the kernel
                times.append(dt)
        used = numba.get_num_threads()
    finally:
        numba.set_num_threads(before)
    return {"bytes_per_s": nbytes / min(times), "median_bytes_per_s": nbytes / float(np.median(times)),
            "buffer_bytes": nbytes, "passes": passes, "threads": used, "llc_bytes": last_level_cache_bytes()}
