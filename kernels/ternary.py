"""Ternary x int8 matrix products on 2-bit packed weights.

Layout (Hugging Face BitNet, `quantization_mode: offline`): a linear with
`out` rows and `K` inputs is stored as uint8 `packed` of shape (R, K) with
R = out // 4. Ternary w in {-1, 0, 1} is stored as the code w + 1 in two bits;
output row `i * R + r` (i in 0..3) sits in bits 2i..2i+1 of `packed[r, c]`.
One packed row therefore feeds four output rows.

The kernel multiplies codes (0, 1, 2) by int8 activations and subtracts the
activation row sum (sum((w + 1) * x) - sum(x) = sum(w * x)), as bitnet.cpp's
I2_S does; one kernel ends in `epilogue.store`, which writes that int32 sum, or dequantizes it
(float32 out): y = acc / div[t] * mul, in that order. With
div = activation scale s and mul = weight_scale this is transformers'
AutoBitLinear; with div = s * weight_scale and mul = 1 it is, bit for bit,
transformers' BitLinear (`acc / (s * weight_scale)`).

Under the `amx` instruction set, calls of at least `TILE_TOKENS` tokens (prefill, batched decode)
run the AMX tile kernel of `ternary_amx.py` instead, with the same result bit for bit; fewer
tokens run `_ternary_kernel` on AVX-512 VNNI.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import ISA, NJIT, NJIT_PARALLEL, njit
from .epilogue import store, unused_factors
from .isa import ISAS
from .simd import BLOCK, MAX_COLS, dot4_tile1, dot4_tile2
from .ternary_amx import amx_ternaries

TILE_TOKENS = ISAS[ISA].tile_tokens  # calls with at least this many tokens run on tiles (0: never)

_M3 = np.int32(3)
_S2 = np.int32(2)
_S4 = np.int32(4)
_S6 = np.int32(6)


def pack_ternary(w: np.ndarray) -> np.ndarray:
    """Pack ternary w (out, K) in {-1, 0, 1} into uint8 (out // 4, K), Hugging Face layout."""
    w = np.asarray(w)
    out, K = w.shape
    if out % 4:
        raise ValueError(f"packed ternary weights need a row count that is a multiple of 4, got {out}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("ternary weights must be in {-1, 0, 1}")
    R = out // 4
    codes = (w.astype(np.int16) + 1).astype(np.uint8).reshape(4, R, K)  # (4, R, K)
    packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
    return np.ascontiguousarray(packed, dtype=np.uint8)


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_ternary`: uint8 (R, K) -> int8 (4R, K) in {-1, 0, 1} (code 3 reads as 2)."""
    packed = np.asarray(packed, dtype=np.uint8)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1, 1)
    codes = (packed[None, :, :] >> shifts) & 3  # (4, R, K)
    return (codes.astype(np.int8) - 1).reshape(-1, packed.shape[1])


def ternary_matmul_ref(packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """NumPy reference: int32 (T, 4R) = q (T, K) int8 @ unpack(packed).T."""
    w = unpack_ternary(packed).astype(np.int64)
    return (np.asarray(q, dtype=np.int64) @ w.T).astype(np.int32)


@njit(**NJIT)
def _tail(packed, r, q, t, c0):  # pragma: no cover - compiled
    """Code-weighted sums of packed row r with q[t] over columns c0.. (the part short of a block)."""
    a0 = a1 = a2 = a3 = np.int32(0)
    for c in range(c0, packed.shape[1]):
        b = np.int32(packed[r, c])
        x = np.int32(q[t, c])
        a0 = np.int32(a0 + np.int32(b & _M3) * x)
        a1 = np.int32(a1 + np.int32((b >> _S2) & _M3) * x)
        a2 = np.int32(a2 + np.int32((b >> _S4) & _M3) * x)
        a3 = np.int32(a3 + np.int32(b >> _S6) * x)
    return a0, a1, a2, a3


@njit(**NJIT)
def _sums1(packed, r, q, t):  # pragma: no cover - compiled
    """Four int32 sums of codes * q[t] over packed row r: output rows r, R + r, 2R + r, 3R + r."""
    nb = packed.shape[1] // BLOCK
    s = dot4_tile1(packed[r], q, t, nb)  # SIMD over whole blocks of 32 columns
    e = _tail(packed, r, q, t, nb * BLOCK)
    return s[0] + e[0], s[1] + e[1], s[2] + e[2], s[3] + e[3]


@njit(**NJIT)
def _sums2(packed, r, q, t):  # pragma: no cover - compiled
    """`_sums1` for tokens t and t + 1 at once: the codes are unpacked once for both."""
    nb = packed.shape[1] // BLOCK
    s = dot4_tile2(packed[r], q, t, nb)
    e = _tail(packed, r, q, t, nb * BLOCK)
    f = _tail(packed, r, q, t + 1, nb * BLOCK)
    return (s[0] + e[0], s[1] + e[1], s[2] + e[2], s[3] + e[3],
            s[4] + f[0], s[5] + f[1], s[6] + f[2], s[7] + f[3])


@njit(**NJIT)
def _put4(out, t, r, a0, a1, a2, a3, s, d, mul):  # pragma: no cover - compiled
    """Store the four sums of packed row r (output rows r, R + r, 2R + r, 3R + r) of token t."""
    R = out.shape[1] // 4
    store(out, t, r, a0, s, d, mul)
    store(out, t, R + r, a1, s, d, mul)
    store(out, t, 2 * R + r, a2, s, d, mul)
    store(out, t, 3 * R + r, a3, s, d, mul)


@njit(**NJIT)
def _locate(packs, g):  # pragma: no cover - compiled
    """(i, r): the linear and packed row that row g of all of packs' rows, one after the other, is."""
    i = 0
    while g >= packs[i].shape[0]:
        g -= packs[i].shape[0]
        i += 1
    return i, g


@njit(**NJIT_PARALLEL)
def _ternary_kernel(packs, q, qsum, divs, muls, outs):  # pragma: no cover - compiled
    """outs[i] (T, 4R_i) from the code-weighted sums of packs[i] (R_i, K) with q (T, K), through `store`
    (exact int32 or dequantized float32, by the outputs' dtype; divs[i], muls[i] dequantize outs[i]).
    Several linears that read the same activations (q/k/v, gate/up) share one parallel loop over all
    their packed rows: one wake-up of the threads instead of one per linear."""
    T = q.shape[0]
    rows = 0
    for i in range(len(packs)):
        rows += packs[i].shape[0]
    for g in prange(rows):
        i, r = _locate(packs, np.int64(g))
        packed, out, div, mul = packs[i], outs[i], divs[i], muls[i]
        for t in range(0, T - 1, 2):
            s = _sums2(packed, r, q, t)
            _put4(out, t, r, s[0], s[1], s[2], s[3], qsum[t], div[t], mul)
            _put4(out, t + 1, r, s[4], s[5], s[6], s[7], qsum[t + 1], div[t + 1], mul)
        if T % 2:
            s1 = _sums1(packed, r, q, T - 1)
            _put4(out, T - 1, r, s1[0], s1[1], s1[2], s1[3], qsum[T - 1], div[T - 1], mul)


def _run(packs, q, qsum, divs, muls, outs) -> None:
    """outs from the tile kernel of this instruction set for many tokens (one call per linear), else one
    call of `_ternary_kernel` for all of them."""
    if TILE_TOKENS and q.shape[0] >= TILE_TOKENS:
        amx_ternaries(packs, q, qsum, divs, muls, outs)
    else:
        _ternary_kernel(tuple(_readonly(p) for p in packs), q, qsum, np.ascontiguousarray(divs, np.float32),
                        np.ascontiguousarray(muls, np.float32), tuple(outs))


def _readonly(packed: np.ndarray) -> np.ndarray:
    """A read-only C-contiguous view: weights mapped from a file are read-only, weights made in memory
    are not, and Numba needs one array type for every linear of a call."""
    view = np.ascontiguousarray(packed).view()
    view.setflags(write=False)
    return view


def _check(packed: np.ndarray, q: np.ndarray) -> None:
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed weights must be 2-D uint8, got {packed.dtype} {packed.shape}")
    if q.dtype != np.int8 or q.ndim != 2 or q.shape[1] != packed.shape[1]:
        raise ValueError(f"activations must be int8 (T, {packed.shape[1]}), got {q.dtype} {q.shape}")
    if packed.shape[1] >= MAX_COLS:
        raise ValueError(f"rows of {packed.shape[1]} columns are too long for int32 sums (at most {MAX_COLS - 1})")


def ternary_matmul(packed: np.ndarray, q: np.ndarray, qsum: np.ndarray | None = None) -> np.ndarray:
    """Exact int32 (T, 4R) = q @ unpack(packed).T with the Numba kernel."""
    q = np.ascontiguousarray(q)
    _check(packed, q)
    if qsum is None:
        qsum = q.astype(np.int32).sum(axis=1).astype(np.int32)
    out = np.empty((q.shape[0], 4 * packed.shape[0]), dtype=np.int32)
    div, mul = unused_factors(q.shape[0])
    _run([packed], q, qsum, div[None], [mul], [out])
    return out


def dequant_factors(scale: np.ndarray, weight_scale: float, divides: bool) -> tuple[np.ndarray, np.float32]:
    """Per-token divisor and common multiplier for `ternary_linear`.

    divides=False (AutoBitLinear): y = acc / s * weight_scale.
    divides=True (BitLinear):      y = acc / (s * weight_scale).
    """
    ws = np.float32(weight_scale)
    if divides:
        return (np.asarray(scale, np.float32) * ws).astype(np.float32), np.float32(1.0)
    return np.asarray(scale, np.float32), ws


def ternary_linears(packs, q, qsum, divs, muls) -> list[np.ndarray]:
    """Several linears on the same activations q (T, K), in one parallel call: dequantized float32
    (T, 4R_i) = (q @ W_i.T) / divs[i][:, None] * muls[i] for each packed W_i (R_i, K)."""
    q = np.ascontiguousarray(q)
    for packed in packs:
        _check(packed, q)
    outs = [np.empty((q.shape[0], 4 * packed.shape[0]), dtype=np.float32) for packed in packs]
    _run(packs, q, qsum, np.asarray(divs, np.float32).reshape(len(packs), q.shape[0]), muls, outs)
    return outs


def ternary_linear(packed, q, qsum, div, mul, out=None) -> np.ndarray:
    """Dequantized float32 (T, 4R): (q @ W.T) / div[:, None] * mul."""
    q = np.ascontiguousarray(q)
    _check(packed, q)
    if out is None:
        out = np.empty((q.shape[0], 4 * packed.shape[0]), dtype=np.float32)
    _run([packed], q, qsum, np.asarray(div, np.float32)[None], [mul], [out])
    return out


def ternary_linear_ref(packed, q, div, mul) -> np.ndarray:
    """NumPy reference for `ternary_linear` (same float32 operation order)."""
    acc = ternary_matmul_ref(packed, q).astype(np.float32)
    return ((acc / np.asarray(div, np.float32)[:, None]) * np.float32(mul)).astype(np.float32)
