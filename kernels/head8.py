"""An int8 output head: the tied embedding quantized per row, int8 x int8 dot products.

Half the bytes of the bf16 head (1 byte per weight plus a float32 scale per
row), read once per decode step, so single-stream decode moves fewer bytes.
It changes the logits slightly (per-row absmax int8 weights, per-token
absmax int8 hidden states), so it is an option, not the default.

Both operands are clamped to [-127, 127] so that the AVX2 path
(`vpsignb` + `vpmaddubsw`: |w| as unsigned times sign(w) * x as signed)
cannot saturate its int16 pairs: 2 * 127 * 127 = 32258 < 32767. VNNI paths
multiply w + 128 as an unsigned byte and subtract 128 times the hidden row's
sum (`hsum`, over the columns of whole SIMD blocks), computed once per call;
where the CPU has `vpdpbssd` (AVX-VNNI-INT8, AVX10.2) the product is signed x
signed and the offset is 0.
Under the `amx` instruction set, calls of at least `TILE_TOKENS` tokens run on
AMX tiles (`head8_amx.py`, `tdpbssd`: signed x signed), with the same logits.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .bf16 import bf16_to_f32
from .config import ISA, NJIT, NJIT_PARALLEL, njit
from .head8_amx import amx_head
from .isa import ISAS
from .simd import BLOCK, dot_s8_tile1, dot_s8_tile2

TILE_TOKENS = ISAS[ISA].head_tile_tokens  # calls with at least this many tokens run on tiles (0: never)

_ROWS_PER_TASK = 8


def quantize_head(embed_bf16: np.ndarray, rows_per_chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """bf16 (V, K) -> int8 (V, K) in [-127, 127] and float32 (V,) scales, chunk by chunk."""
    V, K = embed_bf16.shape
    q = np.empty((V, K), dtype=np.int8)
    scale = np.empty(V, dtype=np.float32)
    for a in range(0, V, rows_per_chunk):
        w = bf16_to_f32(embed_bf16[a:a + rows_per_chunk])  # (chunk, K)
        amax = np.maximum(np.abs(w).max(axis=1), np.float32(1e-12))
        s = (np.float32(127.0) / amax).astype(np.float32)
        q[a:a + len(w)] = np.clip(np.round(w * s[:, None]), -127, 127).astype(np.int8)
        scale[a:a + len(w)] = np.float32(1.0) / s
    return q, scale


def quantize_hidden(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (T, K) -> int8 (T, K) in [-127, 127] and float32 (T,) dequantization scales."""
    h = np.asarray(h, dtype=np.float32)
    amax = np.maximum(np.abs(h).max(axis=1), np.float32(1e-12))
    s = (np.float32(127.0) / amax).astype(np.float32)
    return np.clip(np.round(h * s[:, None]), -127, 127).astype(np.int8), (np.float32(1.0) / s).astype(np.float32)


@njit(**NJIT)
def _tail(a, b, t, c0):  # pragma: no cover - compiled
    acc = np.int32(0)
    for c in range(c0, a.shape[0]):
        acc = np.int32(acc + np.int32(a[c]) * np.int32(b[t, c]))
    return acc


@njit(**NJIT_PARALLEL)
def _head_i8(w, wscale, hq, hsum, hscale, out):  # pragma: no cover - compiled
    V, K = w.shape
    T = hq.shape[0]
    nb = K // BLOCK
    n_tasks = (V + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for task in prange(n_tasks):
        v0, v1 = task * _ROWS_PER_TASK, min(V, (task + 1) * _ROWS_PER_TASK)
        for t in range(0, T - 1, 2):  # token pairs outside: the task's rows stay in L1 for all of them
            for v in range(v0, v1):
                s = dot_s8_tile2(w[v], hq, hsum, t, nb)
                out[t, v] = np.float32(s[0] + _tail(w[v], hq, t, nb * BLOCK)) * (wscale[v] * hscale[t])
                out[t + 1, v] = np.float32(s[1] + _tail(w[v], hq, t + 1, nb * BLOCK)) * (wscale[v] * hscale[t + 1])
        for v in range(v0, v1):
            if T % 2:
                s1 = dot_s8_tile1(w[v], hq, hsum, T - 1, nb)
                out[T - 1, v] = np.float32(s1 + _tail(w[v], hq, T - 1, nb * BLOCK)) * (wscale[v] * hscale[T - 1])


def head_i8(w: np.ndarray, wscale: np.ndarray, h: np.ndarray) -> np.ndarray:
    """float32 logits (T, V) from int8 head w (V, K) with row scales and float32 hidden h (T, K)."""
    hq, hscale = quantize_hidden(h)
    out = np.empty((hq.shape[0], w.shape[0]), dtype=np.float32)
    if TILE_TOKENS and hq.shape[0] >= TILE_TOKENS:
        amx_head(w, wscale, hq, hscale, out)
        return out
    hsum = hq[:, :hq.shape[1] // BLOCK * BLOCK].sum(axis=1, dtype=np.int32)  # (T,) over whole blocks
    _head_i8(w, wscale, hq, hsum, hscale, out)
    return out


def head_i8_ref(w: np.ndarray, wscale: np.ndarray, h: np.ndarray) -> np.ndarray:
    """NumPy reference: exact int32 dot products, same float32 dequantization order."""
    hq, hscale = quantize_hidden(h)
    acc = (hq.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32).astype(np.float32)  # (T, V)
    return acc * (wscale[None, :] * hscale[:, None]).astype(np.float32)
