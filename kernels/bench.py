"""Kernel timings for `ternpool bench kernels`, with this machine's own yardsticks measured in the
same run: memory read bandwidth (a sum over 1 GiB, all threads and NumPy's one) and NumPy float32
matmul on the same shapes."""

from __future__ import annotations

import time

import numba
import numpy as np
from numba import prange

from .bf16 import bf16_matmul, f32_to_bf16
from .config import NJIT_PARALLEL_FAST, njit
from .head8 import head_i8, quantize_head
from .quantize import quantize_rows
from .base3 import base3_linear, pack_base3
from .ternary import dequant_factors, pack_ternary, ternary_linear


def _best(fn, repeat: int, min_time: float = 0.2) -> float:
    fn()  # warm up (compile, caches)
    best = float("inf")
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


@njit(**NJIT_PARALLEL_FAST)
def _parallel_sum(a, chunks):  # pragma: no cover - compiled
    n = a.shape[0]
    step = (n + chunks - 1) // chunks
    part = np.zeros(chunks)
    for c in prange(chunks):
        s = 0.0
        for i in range(c * step, min(n, (c + 1) * step)):
            s += a[i]
        part[c] = s
    return part.sum()


def read_bandwidth(gib: float = 1.0, repeat: int = 3, parallel: bool = True) -> float:
    """Bytes/s read summing a float64 array of `gib` GiB: with every Numba thread (the ceiling the
    kernels share), or with NumPy's one-thread sum (parallel=False)."""
    a = np.ones(int(gib * 2 ** 30 // 8), dtype=np.float64)
    if parallel:
        chunks = 64 * numba.get_num_threads()
        return a.nbytes / _best(lambda: _parallel_sum(a, chunks), repeat, min_time=0.0)
    return a.nbytes / _best(lambda: a.sum(), repeat, min_time=0.0)


def bench_linears(shapes: dict[str, tuple[int, int]], batches=(1, 8, 32, 64), repeat: int = 3,
                  vocab: int | None = None, seed: int = 0) -> list[dict]:
    """Time every (name, (out, in)) ternary linear in both layouts (2-bit, 1.6-bit) and the output head
    (bf16, int8) at each batch size."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (out, k) in shapes.items():
        w = rng.integers(-1, 2, size=(out, k)).astype(np.int8)
        layouts = {"2bit": (pack_ternary(w), ternary_linear), "1.6bit": (pack_base3(w), base3_linear)}
        wf = rng.standard_normal((k, out)).astype(np.float32)  # numpy's float32 yardstick
        for t in batches:
            x = rng.standard_normal((t, k)).astype(np.float32)
            q, qsum, scale = quantize_rows(x)
            div, mul = dequant_factors(scale, 1.0, False)
            ref = _best(lambda: x @ wf, repeat)
            for fmt, (packed, fn) in layouts.items():
                ours = _best(lambda: fn(packed, q, qsum, div, mul), repeat)
                rows.append(_row(name, out, k, t, ours, ref, packed.nbytes, fmt))
    if vocab:
        k = next(iter(shapes.values()))[1]
        e = f32_to_bf16((rng.standard_normal((vocab, k)) * 0.02).astype(np.float32))
        w8, s8 = quantize_head(e)
        wf = rng.standard_normal((k, vocab)).astype(np.float32)
        for t in batches:
            h = rng.standard_normal((t, k)).astype(np.float32)
            ref = _best(lambda: h @ wf, repeat)
            rows.append(_row("head", vocab, k, t, _best(lambda: bf16_matmul(e, h), repeat), ref, e.nbytes, "bf16"))
            rows.append(_row("head", vocab, k, t, _best(lambda: head_i8(w8, s8, h), repeat), ref,
                             w8.nbytes + s8.nbytes, "int8"))
    return rows


def _row(name, out, k, t, ours, ref, weight_bytes, fmt) -> dict:
    macs = out * k * t
    return {"name": name, "format": fmt, "out": out, "in": k, "batch": t, "seconds": ours, "gmacs": macs / ours / 1e9,
            "weight_gbs": weight_bytes / ours / 1e9, "numpy_f32_seconds": ref, "vs_numpy_f32": ref / ours}
