"""Ternary x int8 matrix products on base-3 packed weights: 5 weights per byte (1.6 bits each).

Layout: a ternary w (out, K) in {-1, 0, 1} is stored as uint8 (out, 32 * ceil(K / 160)).
Columns come in blocks of 160; block j is the 32 bytes 32j .. 32j + 31 of a row, and its
byte i holds the codes d = w + 1 of columns 160j + 32k + i for k = 0..4 (digit k), as

    v = d0 * 81 + d1 * 27 + d2 * 9 + d3 * 3 + d4,    b = ceil(v * 256 / 243)  (<= 255).

Decoding: x0 = b; d_k = (x_k * 3) >> 8; x_{k+1} = (x_k * 3) & 255 (exact for all 243 values;
every byte decodes to digits in {0, 1, 2}). Digit k of a 32-byte block is thus the codes of
the contiguous activation slice x[160j + 32k : 160j + 32k + 32]. Columns past K in the last
block hold code 1 (zero weight); the kernels never read them.

Batch 1 (one token, or the last one of a batch) is compute-bound on the decode: there a task's
rows r0 .. r1 - 1 go four per `dot_base3_rows4` call, which shares every activation load and
interleaves four independent decode chains. The four are r, r + h, r + 2h, r + 3h (h = (r1 - r0)
// 4) so that each call reads four long sequential streams (neighbouring rows would start new short
streams every call, which the hardware prefetchers follow badly: ~25% slower on 45568 x 8192);
for the same reason a batch-1 task holds _ROWS_PER_TASK_1 = 128 rows when the matrix has enough of
them. The 2 or 3 rows left over go through `dot_base3_rows2` and then `dot_base3_1`.

Where one vector holds GROUP > 1 blocks (zmm: 2), the kernel first copies q into the grouped
layout (`group_digits`), so that the digit-k slices of the blocks that share a vector are one load
(see `simd_base3.py`); a copy of T x K bytes per call, against T x K x out multiply-adds.

As in `ternary.py`, one kernel sums codes * q and ends in `epilogue.store`: the activation row
sum subtracted, then int32 out as is, or float32 out dequantized y = acc / div[t] * mul in that
order (see `dequant_factors`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .config import NJIT, NJIT_PARALLEL, njit
from .epilogue import store, unused_factors
from .simd_base3 import (BLOCK, BLOCK_BYTES, DIGITS, GROUP, dot_base3_1, dot_base3_2, dot_base3_4, dot_base3_8,
                         dot_base3_rows2, dot_base3_rows4)

_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)
_M8 = np.int32(255)
_S8 = np.int32(8)
_THREE = np.int32(3)
_ROWS_PER_TASK = 16  # rows per prange task; each token group is reused across them
_ROWS_PER_TASK_1 = 128  # rows per task at batch 1 when that still makes >= 16 tasks (see the docstring)


def packed_cols(K: int) -> int:
    """Bytes per packed row for K columns: 32 * ceil(K / 160)."""
    return BLOCK_BYTES * (-(-K // BLOCK))


def encode_base3(digits: np.ndarray) -> np.ndarray:
    """(..., 5) codes in {0, 1, 2} -> uint8 (...) fixed-point bytes ceil(v * 256 / 243)."""
    v = np.asarray(digits, dtype=np.int32) @ _POW3
    return ((v * 256 + 242) // 243).astype(np.uint8)


def decode_base3(b: np.ndarray) -> np.ndarray:
    """uint8 (...) -> uint8 (..., 5) codes, digit k = ((b * 3^k) & 255) * 3 >> 8."""
    x = np.asarray(b, dtype=np.uint8).astype(np.uint16)
    digits = []
    for _ in range(DIGITS):
        x = x * 3
        digits.append(x >> 8)
        x = x & 255
    return np.stack(digits, axis=-1).astype(np.uint8)


def pack_base3(w: np.ndarray) -> np.ndarray:
    """Pack ternary w (out, K) in {-1, 0, 1} into uint8 (out, 32 * ceil(K / 160))."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"ternary weights must be 2-D (out, K), got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("ternary weights must be in {-1, 0, 1}")
    out, K = w.shape
    nblk = -(-K // BLOCK)
    codes = np.ones((out, nblk * BLOCK), dtype=np.uint8)  # padding: code 1, weight 0
    codes[:, :K] = (w.astype(np.int16) + 1).astype(np.uint8)
    digits = codes.reshape(out, nblk, DIGITS, BLOCK_BYTES).transpose(0, 1, 3, 2)  # (out, nblk, 32, 5)
    return np.ascontiguousarray(encode_base3(digits).reshape(out, nblk * BLOCK_BYTES))


def unpack_base3(packed: np.ndarray, K: int) -> np.ndarray:
    """Inverse of `pack_base3`: uint8 (out, 32 * ceil(K / 160)) -> int8 (out, K) in {-1, 0, 1}."""
    packed = np.asarray(packed, dtype=np.uint8)
    _check_cols(packed, K)
    out, nbytes = packed.shape
    nblk = nbytes // BLOCK_BYTES
    digits = decode_base3(packed.reshape(out, nblk, BLOCK_BYTES)).transpose(0, 1, 3, 2)  # (out, nblk, 5, 32)
    return (digits.reshape(out, nblk * BLOCK)[:, :K].astype(np.int8) - 1).astype(np.int8)


def base3_matmul_ref(packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """NumPy reference: int32 (T, out) = q (T, K) int8 @ unpack_base3(packed, K).T."""
    q = np.asarray(q)
    w = unpack_base3(packed, q.shape[1]).astype(np.int64)
    return (q.astype(np.int64) @ w.T).astype(np.int32)


def group_digits_ref(q: np.ndarray, group: int) -> np.ndarray:
    """NumPy reference of `group_digits`: int8 (T, K) -> (T, K), the columns of each run of `group`
    whole blocks reordered digit-major: block h's 32 columns of digit k move to 32 (k * group + h)
    within the run; the columns after the last whole run stay where they are."""
    q = np.asarray(q)
    T, K = q.shape
    n = K // (group * BLOCK) * group * BLOCK
    out = q.copy()
    runs = q[:, :n].reshape(T, -1, group, DIGITS, BLOCK_BYTES)  # (T, run, block, digit, 32)
    out[:, :n] = runs.transpose(0, 1, 3, 2, 4).reshape(T, n)
    return out


@njit(**NJIT)
def group_digits(q, group):  # pragma: no cover - compiled
    """q (T, K) int8 in the grouped layout of `group` blocks per vector (see `group_digits_ref`):
    a new array."""
    T, K = q.shape
    run = group * BLOCK
    n = K // run * run
    out = np.empty((T, K), dtype=np.int8)
    for t in range(T):
        for s in range(0, n, run):
            for k in range(DIGITS):
                for h in range(group):
                    dst = s + (k * group + h) * BLOCK_BYTES
                    src = s + h * BLOCK + k * BLOCK_BYTES
                    out[t, dst:dst + BLOCK_BYTES] = q[t, src:src + BLOCK_BYTES]
        out[t, n:] = q[t, n:]
    return out


@njit(**NJIT)
def _as_is(q):  # pragma: no cover - compiled
    return q


@njit(**NJIT)
def _grouped(q):  # pragma: no cover - compiled
    return group_digits(q, GROUP)


_layout = _grouped if GROUP > 1 else _as_is  # the activations as this process's emitters read them


@njit(**NJIT)
def _tail(p, x, nb, nd, K):  # pragma: no cover - compiled
    """int32 sum of codes * x over columns 160 nb + 32 nd .. K - 1 (fewer than 32): digit nd of
    bytes 32 nb + i, one column at a time."""
    c0 = nb * BLOCK + nd * BLOCK_BYTES
    base = nb * BLOCK_BYTES
    acc = np.int32(0)
    for i in range(K - c0):
        v = np.int32(p[base + i])
        for _ in range(nd):
            v = (v * _THREE) & _M8
        acc = np.int32(acc + ((v * _THREE) >> _S8) * np.int32(x[c0 + i]))
    return acc


@njit(**NJIT)
def _dots(p, q, t, nt, nb, nd):  # pragma: no cover - compiled
    """SIMD code-weighted sums of packed row p with q[t .. t + nt - 1] (nt = 1, 2, 4 or 8; the
    rest of the 8-tuple is 0), over the whole blocks and whole digits of the last block."""
    z = np.int32(0)
    if nt == 8:
        return dot_base3_8(p, q[t], q[t + 1], q[t + 2], q[t + 3], q[t + 4], q[t + 5], q[t + 6], q[t + 7], nb, nd)
    if nt == 4:
        a0, a1, a2, a3 = dot_base3_4(p, q[t], q[t + 1], q[t + 2], q[t + 3], nb, nd)
        return a0, a1, a2, a3, z, z, z, z
    if nt == 2:
        a0, a1 = dot_base3_2(p, q[t], q[t + 1], nb, nd)
        return a0, a1, z, z, z, z, z, z
    return dot_base3_1(p, q[t], nb, nd), z, z, z, z, z, z, z


@njit(**NJIT)
def _sum1(acc, p, x, nb, nd, K, scalar):  # pragma: no cover - compiled
    """A SIMD sum of packed row p with x, plus the scalar columns if any."""
    return np.int32(acc + _tail(p, x, nb, nd, K)) if scalar else acc


@njit(**NJIT)
def _group(T, t):  # pragma: no cover - compiled
    """Tokens sharing one decode: 8 while at least 8 remain, then 4, 2, 1."""
    n = T - t
    return 8 if n >= 8 else (4 if n >= 4 else (2 if n >= 2 else 1))


@njit(**NJIT_PARALLEL)
def _base3_kernel(packed, q, qsum, div, mul, out):  # pragma: no cover - compiled
    """out (T, n) from the code-weighted sums of packed (n, 32 nblk) with q (T, K), through `store`
    (exact int32 or dequantized float32, by out's dtype)."""
    n = packed.shape[0]
    T, K = q.shape
    q = _layout(q)  # (T, K), grouped where a vector holds several blocks
    nb = K // BLOCK
    nd = (K - nb * BLOCK) // BLOCK_BYTES
    scalar = K > nb * BLOCK + nd * BLOCK_BYTES
    rpt = _ROWS_PER_TASK_1 if T == 1 and n >= 16 * _ROWS_PER_TASK_1 else _ROWS_PER_TASK
    for task in prange((n + rpt - 1) // rpt):
        r0 = task * rpt
        r1 = min(n, r0 + rpt)
        t = 0
        while t < T:  # a few tokens at a time, their activations stay in cache across the task's rows
            nt = _group(T, t)
            rs = r0
            if nt == 1:  # one token: 4 packed rows per decode call (see _ROWS_PER_TASK_1), then 2, then 1
                x = q[t]
                s, d = qsum[t], div[t]
                h = (r1 - r0) // 4
                for i in range(r0, r0 + h):
                    a = dot_base3_rows4(packed[i], packed[i + h], packed[i + 2 * h], packed[i + 3 * h], x, nb, nd)
                    for j in range(4):
                        r = i + j * h
                        store(out, t, r, _sum1(a[j], packed[r], x, nb, nd, K, scalar), s, d, mul)
                rs = r0 + 4 * h
                if r1 - rs >= 2:
                    a0, a1 = dot_base3_rows2(packed[rs], packed[rs + 1], x, nb, nd)
                    store(out, t, rs, _sum1(a0, packed[rs], x, nb, nd, K, scalar), s, d, mul)
                    store(out, t, rs + 1, _sum1(a1, packed[rs + 1], x, nb, nd, K, scalar), s, d, mul)
                    rs += 2
            for r in range(rs, r1):
                p = packed[r]
                a = _dots(p, q, t, nt, nb, nd)
                for j in range(nt):
                    acc = a[j]
                    if scalar:
                        acc = np.int32(acc + _tail(p, q[t + j], nb, nd, K))
                    store(out, t + j, r, acc, qsum[t + j], div[t + j], mul)
            t += nt


def _check_cols(packed: np.ndarray, K: int) -> None:
    if packed.ndim != 2 or packed.shape[1] != packed_cols(K):
        raise ValueError(f"base-3 packed weights for K={K} must have {packed_cols(K)} bytes per row "
                         f"(32 per 160 columns), got shape {packed.shape}")


def _check(packed: np.ndarray, q: np.ndarray) -> None:
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed weights must be 2-D uint8, got {packed.dtype} {packed.shape}")
    if q.dtype != np.int8 or q.ndim != 2:
        raise ValueError(f"activations must be 2-D int8 (T, K), got {q.dtype} {q.shape}")
    _check_cols(packed, q.shape[1])


def _prepare(packed, q, qsum):
    packed, q = np.ascontiguousarray(packed), np.ascontiguousarray(q)
    _check(packed, q)
    if qsum is None:
        qsum = q.astype(np.int32).sum(axis=1).astype(np.int32)
    qsum = np.ascontiguousarray(qsum, dtype=np.int32)
    if qsum.shape != (q.shape[0],):
        raise ValueError(f"qsum must have shape ({q.shape[0]},), got {qsum.shape}")
    return packed, q, qsum


def base3_matmul(packed: np.ndarray, q: np.ndarray, qsum: np.ndarray | None = None) -> np.ndarray:
    """Exact int32 (T, out) = q @ unpack_base3(packed, K).T with the Numba kernel (K = q.shape[1])."""
    packed, q, qsum = _prepare(packed, q, qsum)
    out = np.empty((q.shape[0], packed.shape[0]), dtype=np.int32)
    _base3_kernel(packed, q, qsum, *unused_factors(q.shape[0]), out)
    return out


def base3_linear(packed, q, qsum, div, mul, out=None) -> np.ndarray:
    """Dequantized float32 (T, out): (q @ W.T) / div[:, None] * mul (see `dequant_factors`)."""
    packed, q, qsum = _prepare(packed, q, qsum)
    div = np.ascontiguousarray(div, dtype=np.float32)
    if div.shape != (q.shape[0],):
        raise ValueError(f"div must have shape ({q.shape[0]},), got {div.shape}")
    shape = (q.shape[0], packed.shape[0])
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    _base3_kernel(packed, q, qsum, div, np.float32(mul), out)
    return out


def base3_linear_ref(packed, q, div, mul) -> np.ndarray:
    """NumPy reference for `base3_linear` (same float32 operation order)."""
    acc = base3_matmul_ref(packed, q).astype(np.float32)
    return ((acc / np.asarray(div, np.float32)[:, None]) * np.float32(mul)).astype(np.float32)
