"""bfloat16 storage: conversion and the tied output head.

bf16 is kept as uint16 (NumPy has no bfloat16); its bits shifted left by 16
are the float32 value. The output head multiplies hidden states by the bf16
embedding matrix without ever materializing a float32 copy of it.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT_PARALLEL_FAST, njit

_ROWS_PER_TASK = 16


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 (exact)."""
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bits, round to nearest even (as torch does); NaN stays NaN."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    out[nan] = 0x7FC0
    return out


@njit(**NJIT_PARALLEL_FAST)
def _bf16_matmul(w, h, out):  # pragma: no cover - compiled
    V, K = w.shape
    T = h.shape[0]
    n_tasks = (V + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        bits = np.empty(K, dtype=np.uint32)
        row = bits.view(np.float32)
        for v in range(task * _ROWS_PER_TASK, min(V, (task + 1) * _ROWS_PER_TASK)):
            for k in range(K):
                bits[k] = np.uint32(w[v, k]) << np.uint32(16)
            for t in range(T):
                acc = np.float32(0.0)
                for k in range(K):
                    acc += row[k] * h[t, k]
                out[t, v] = acc


def bf16_matmul(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """float32 (T, V) = h (T, K) @ bf16(w (V, K)).T; w stays in bf16."""
    h = np.ascontiguousarray(h, dtype=np.float32)
    if w.dtype != np.uint16 or w.ndim != 2 or h.ndim != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(f"expected w uint16 (V, K) and h (T, K), got {w.dtype} {w.shape} and {h.shape}")
    out = np.empty((h.shape[0], w.shape[0]), dtype=np.float32)
    _bf16_matmul(w, h, out)
    return out


def bf16_matmul_ref(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """NumPy reference for `bf16_matmul` (float64 accumulation)."""
    return (np.asarray(h, np.float64) @ bf16_to_f32(w).astype(np.float64).T).astype(np.float32)
