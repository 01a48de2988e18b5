"""Kernel timings for `ternpool bench kernels`, with this machine's own yardsticks measured in the
same run (memory read bandwidth, `bandwidth.py`, and NumPy float32 matmul on the same shapes), and
which kernel path ran on which CPU features."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from llvmlite import binding as _llvm

from .bf16 import bf16_matmul, f32_to_bf16
from .config import ISA
from .head8 import head_i8, quantize_head
from .isa import ISAS, usable_isas
from .quantize import quantize_rows
from .base3 import base3_linear, pack_base3
from .ternary import dequant_factors, pack_ternary, ternary_linear

log = logging.getLogger(__name__)


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


# CPU features (LLVM's names) that decide which kernel path can run, printed by the benches; the
# features of every registered instruction set are added to these.
FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "avxvnniint8", "amx-tile", "amx-int8")


def kernel_path() -> dict:
    """Which instruction-set strategy the kernels of this process run (`config.ISA`), whether
    TERNPOOL_ISA forced it, the registered ones this CPU can run (best first), the CPU's name and which
    of the features that matter it has: {isa, forced, usable, registered, cpu, features} (features:
    name -> bool, or None when LLVM cannot read this CPU's)."""
    try:
        host = _llvm.get_host_cpu_features()
    except RuntimeError as e:  # pragma: no cover - a host LLVM does not know
        log.warning("LLVM cannot read this CPU's features (%s): only the portable kernels can run", e)
        host = None
    names = list(FEATURES) + sorted({f for isa in ISAS.values() for f in isa.features} - set(FEATURES))
    return {"isa": ISA, "forced": bool(os.environ.get("TERNPOOL_ISA")), "usable": usable_isas(host or {}),
            "registered": list(ISAS), "cpu": _llvm.get_host_cpu_name(),
            "features": None if host is None else {name: bool(host.get(name)) for name in names}}


def describe_kernel_path(path: dict) -> str:
    """One line for a person: `kernel_path()` as the benches print it."""
    usable = ", ".join(path["usable"])
    how = f"forced by TERNPOOL_ISA; this CPU can run {usable}" if path["forced"] else f"the best of {usable} here"
    features = path["features"]
    if features is None:
        cpu = "features unknown"
    else:
        has = " ".join(f for f, on in features.items() if on) or "none"
        lacks = " ".join(f for f, on in features.items() if not on) or "none"
        cpu = f"has {has}; lacks {lacks}"
    return f"kernel path {path['isa']} ({how}); CPU {path['cpu']} {cpu}"


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
