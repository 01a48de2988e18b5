"""Kernel timings for `ternpool bench kernels`, with this machine's own yardsticks measured in the
same run: memory read bandwidth (NumPy sum over 1 GiB) and NumPy float32 matmul on the same shapes."""

from __future__ import annotations

import time

import numpy as np

from .bf16 import bf16_matmul, f32_to_bf16
from .head8 import head_i8, quantize_head
from .quantize import quantize_rows
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


def read_bandwidth(gib: float = 1.0, repeat: int = 3) -> float:
    """Bytes/s that NumPy reads summing a float64 array of `gib` GiB."""
    a = np.ones(int(gib * 2 ** 30 // 8), dtype=np.float64)
    return a.nbytes / _best(lambda: a.sum(), repeat, min_time=0.0)


def bench_linears(shapes: dict[str, tuple[int, int]], batches=(1, 8, 32, 64), repeat: int = 3,
                  vocab: int | None = None, seed: int = 0) -> list[dict]:
    """Time every (name, (out, in)) ternary linear and the output head at each batch size."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (out, k) in shapes.items():
        packed = pack_ternary(rng.integers(-1, 2, size=(out, k)).astype(np.int8))
        wf = rng.standard_normal((k, out)).astype(np.float32)  # numpy's float32 yardstick
        for t in batches:
            x = rng.standard_normal((t, k)).astype(np.float32)
            q, qsum, scale = quantize_rows(x)
            div, mul = dequant_factors(scale, 1.0, False)
            ours = _best(lambda: ternary_linear(packed, q, qsum, div, mul), repeat)
            ref = _best(lambda: x @ wf, repeat)
            rows.append(_row(name, out, k, t, ours, ref, packed.nbytes))
    if vocab:
        k = next(iter(shapes.values()))[1]
        e = f32_to_bf16((rng.standard_normal((vocab, k)) * 0.02).astype(np.float32))
        w8, s8 = quantize_head(e)
        wf = rng.standard_normal((k, vocab)).astype(np.float32)
        for t in batches:
            h = rng.standard_normal((t, k)).astype(np.float32)
            ref = _best(lambda: h @ wf, repeat)
            rows.append(_row("head bf16", vocab, k, t, _best(lambda: bf16_matmul(e, h), repeat), ref, e.nbytes))
            rows.append(_row("head int8", vocab, k, t, _best(lambda: head_i8(w8, s8, h), repeat), ref,
                             w8.nbytes + s8.nbytes))
    return rows


def _row(name, out, k, t, ours, ref, weight_bytes) -> dict:
    macs = out * k * t
    return {"name": name, "out": out, "in": k, "batch": t, "seconds": ours, "gmacs": macs / ours / 1e9,
            "weight_gbs": weight_bytes / ours / 1e9, "numpy_f32_seconds": ref, "vs_numpy_f32": ref / ours}
