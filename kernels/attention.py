"""Causal grouped-query attention over a paged KV cache.

The cache is a pool of blocks of B positions each, (blocks, KVH, B, D).
Each token n belongs to sequence `slots[n]` at position `pos[n]` and
attends to positions 0..pos[n] of that sequence (its own K/V already
written); position j of sequence s lives in block `table[s, j // B]` at
offset j % B, so sequences can share the blocks of a common prompt prefix
(engine/blocks.py). Without a table the cache is one block per sequence,
(S, KVH, C, D): block s holds sequence s.
Query head h reads KV head h // (H // KVH). One task computes several query
heads of one KV head together (the whole GQA group, 4 heads on 2b4t), so
each K and V row is read once for all of them, not once per head.

The cache is float32, or bfloat16 kept as its uint16 bits (half the bytes;
kernels/bf16.py): each bf16 row is widened to float32 as it is read, so the
arithmetic is the same float32 either way. The int8 cache's rows (kernels/kv8.py: D int8
values and their float32 scale, a quarter of the bytes plus 4) are widened
the same way, each value times its row's scale: an int8 cache computes
exactly what a float32 cache of its dequantized values does.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from .bf16 import bf16_to_f32
from .config import NJIT_FAST, NJIT_PARALLEL_FAST, njit
from .kv8 import SCALE_BYTES, dequantize_kv, dequantize_row

# query x key products (over all tokens, heads and dims) from which the tasks are split across threads;
# below, the calling thread does them (a decode step of one sequence at short context: waking the
# other threads costs more than the work)
PARALLEL_WORK = 1 << 20

CACHE_DTYPES = (np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.int8))  # float32, bf16 bits, int8 rows


def _row(cache, s, kvh, j, bits, row):  # pragma: no cover - replaced in compiled code by the overload below
    raise NotImplementedError


@overload(_row)
def _row_impl(cache, s, kvh, j, bits, row):
    """cache[s, kvh, j] (D,) as float32: the row itself, or a bf16 or int8 row widened into `row` (a float32
    view of the uint32 `bits`)."""
    if cache.dtype == types.int8:
        return lambda cache, s, kvh, j, bits, row: dequantize_row(cache, s, kvh, j, bits, row)
    if cache.dtype == types.uint16:
        def widen(cache, s, kvh, j, bits, row):
            for d in range(bits.shape[0]):
                bits[d] = np.uint32(cache[s, kvh, j, d]) << np.uint32(16)
            return row
        return widen
    return lambda cache, s, kvh, j, bits, row: cache[s, kvh, j]


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_POLY = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                          1.6666665459e-1, 5.0000001201e-1))


@njit(**NJIT_FAST)
def _exp_shifted(x, best, ibuf):  # pragma: no cover - compiled
    """x[j] = exp(x[j] - best) in place (x <= best), returns their sum in float64. Cephes' expf in
    loops that vectorize (libm's exp is one call per score): x - best = n ln2 + r, |r| <= ln2 / 2,
    exp(r) by a degree-7 polynomial, times 2**n built in the exponent bits; within 3 float32 epsilons
    of exp (relative).
    Arguments below -87 (a weight under 1e-38 next to the best's 1) give 2**-126 times the polynomial."""
    n = x.shape[0]
    for j in range(n):
        a = max(x[j] - best, np.float32(-87.0))
        f = np.rint(a * _LOG2E)
        r = (a - f * _LN2_HI) - f * _LN2_LO
        c0, c1, c2, c3, c4, c5 = _EXP_POLY
        p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        x[j] = (p * r) * r + r + np.float32(1.0)
        ibuf[j] = (np.int32(f) + np.int32(127)) << np.int32(23)
    scale = ibuf[:n].view(np.float32)
    total = 0.0
    for j in range(n):
        e = x[j] * scale[j]
        x[j] = e
        total += e
    return total


@njit(**NJIT_FAST)
def _task(q, k_cache, v_cache, table, slots, pos, scale, per_task, out, task):  # pragma: no cover - compiled
    """Task `task`: `per_task` query heads of one KV head for one token."""
    _, H, D = q.shape
    B = k_cache.shape[2]
    group = H // k_cache.shape[1]
    tasks_per_token = H // per_task
    n = task // tasks_per_token
    h0 = (task - n * tasks_per_token) * per_task  # first of this task's query heads
    kvh = h0 // group
    s = slots[n]
    length = pos[n] + 1
    bits = np.empty(D, dtype=np.uint32)
    row = bits.view(np.float32)
    scores = np.empty((per_task, length), dtype=np.float32)  # (G, L)
    for j0 in range(0, length, B):
        b = table[s, j0 // B]
        for j in range(j0, min(j0 + B, length)):
            k = _row(k_cache, b, kvh, j - j0, bits, row)  # (D,): read once for the G heads
            for g in range(per_task):
                acc = np.float32(0.0)
                for d in range(D):
                    acc += q[n, h0 + g, d] * k[d]
                acc *= scale
                scores[g, j] = acc
    totals = np.empty(per_task, dtype=np.float64)
    ibuf = np.empty(length, dtype=np.int32)  # 2**n of each exp, as float32 bits
    for g in range(per_task):  # softmax of each head's row: float32 exp, its sum in float64
        best = -np.inf
        for j in range(length):
            best = max(best, scores[g, j])
        total = _exp_shifted(scores[g, :length], best, ibuf)
        inv = np.float32(1.0 / total)
        for j in range(length):
            scores[g, j] *= inv
    acc_out = np.zeros((per_task, D), dtype=np.float32)  # (G, D)
    for j0 in range(0, length, B):
        b = table[s, j0 // B]
        for j in range(j0, min(j0 + B, length)):
            v = _row(v_cache, b, kvh, j - j0, bits, row)  # (D,): read once for the G heads
            for g in range(per_task):
                p = scores[g, j]
                for d in range(D):
                    acc_out[g, d] += p * v[d]
    for g in range(per_task):
        for d in range(D):
            out[n, h0 + g, d] = acc_out[g, d]


@njit(**NJIT_FAST)
def _attention_serial(q, k_cache, v_cache, table, slots, pos, scale, per_task, out):  # pragma: no cover - compiled
    for task in range(q.shape[0] * (q.shape[1] // per_task)):
        _task(q, k_cache, v_cache, table, slots, pos, scale, per_task, out, task)


@njit(**NJIT_PARALLEL_FAST)
def _attention_parallel(q, k_cache, v_cache, table, slots, pos, scale, per_task, out):  # pragma: no cover - compiled
    T = q.shape[0] * (q.shape[1] // per_task)
    for i in prange(T):
        # pair cheap and costly tasks (a prefill chunk's positions grow along it), so that each
        # thread's contiguous share of the range gets as much work: i -> 0, T-1, 1, T-2, ...
        j = np.int64(i)
        _task(q, k_cache, v_cache, table, slots, pos, scale, per_task, out, j // 2 if j % 2 == 0 else T - 1 - j // 2)


def heads_per_task(tokens: int, kv_heads: int, group: int, threads: int) -> int:
    """Query heads one task computes: the whole group (each K/V row read once for all of them) unless
    that leaves too few tasks to share evenly among the threads (one decoding sequence: 5 tasks on 2
    threads); then the group is split into the fewest parts that leave at most 1/8 of the thread time
    idle (all heads apart at worst)."""
    for parts in (p for p in range(1, group + 1) if group % p == 0):
        tasks = tokens * kv_heads * parts
        if math.ceil(tasks / threads) * threads * 8 <= tasks * 9:
            return group // parts
    return 1


def attention(q, k_cache, v_cache, slots, pos, scale: float, table=None) -> np.ndarray:
    """q (N, H, D) float32; k/v_cache (blocks, KVH, B, D), both float32 or both bf16 bits (uint16), or
    (blocks, KVH, B, D + 4) int8 rows (kernels/kv8.py); slots, pos (N,) int64; table (S, max blocks) of
    block ids, row s the blocks of sequence s in position order (None: block s is sequence s, B its
    whole context) -> (N, H, D) float32."""
    N, H, D = q.shape
    KVH = k_cache.shape[1]
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"K and V caches must both be float32, both uint16 (bf16 bits) or both int8 (kv8 rows), "
                         f"got {k_cache.dtype} and {v_cache.dtype}")
    width = D + SCALE_BYTES if k_cache.dtype == np.int8 else D
    if H % KVH or k_cache.shape[3] != width or v_cache.shape != k_cache.shape:
        raise ValueError(f"query shape {q.shape} does not fit cache shapes {k_cache.shape}, {v_cache.shape}")
    table = block_table(k_cache, table)
    slots, pos = np.asarray(slots, np.int64), np.asarray(pos, np.int64)
    if N and int(np.max(pos)) >= table.shape[1] * k_cache.shape[2]:
        raise ValueError(f"position {int(np.max(pos))} is past the cache length {table.shape[1] * k_cache.shape[2]}")
    out = np.empty((N, H, D), dtype=np.float32)
    work = (int(np.sum(pos + 1)) if N else 0) * H * D  # query x key products
    parallel = work >= PARALLEL_WORK
    per_task = heads_per_task(N, KVH, H // KVH, numba.get_num_threads()) if parallel else H // KVH
    run = _attention_parallel if parallel else _attention_serial
    run(np.ascontiguousarray(q, np.float32), k_cache, v_cache, table, slots, pos, np.float32(scale), per_task, out)
    return out


def block_table(cache: np.ndarray, table=None) -> np.ndarray:
    """`table` as int64, checked against the cache's blocks; None: (blocks, 1), block s for sequence s."""
    if table is None:
        return np.arange(cache.shape[0], dtype=np.int64)[:, None]
    table = np.asarray(table, np.int64)
    if table.ndim != 2 or (table.size and not 0 <= int(table.min()) <= int(table.max()) < cache.shape[0]):
        raise ValueError(f"block table of shape {table.shape} must hold block ids in 0..{cache.shape[0] - 1}")
    return table


def attention_ref(q, k_cache, v_cache, slots, pos, scale: float, table=None) -> np.ndarray:
    """NumPy reference (float64; a bf16 cache is widened exactly first, an int8 one dequantized to float32)."""
    N, H, D = q.shape
    group = H // k_cache.shape[1]
    table = block_table(k_cache, table)
    out = np.empty((N, H, D), dtype=np.float32)
    for n in range(N):
        blocks = table[slots[n]]
        for h in range(H):
            # the sequence's positions in order: its blocks one after the other, cut at pos[n]
            k, v = (np.concatenate(c[blocks, h // group], axis=0)[: pos[n] + 1] for c in (k_cache, v_cache))
            k, v = (_widened(c).astype(np.float64) for c in (k, v))
            s = k @ q[n, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[n, h] = (p / p.sum()) @ v
    return out


def _widened(cache: np.ndarray) -> np.ndarray:
    """Cache rows as the float32 values the kernel computes with."""
    if cache.dtype == np.uint16:
        return bf16_to_f32(cache)
    return dequantize_kv(cache) if cache.dtype == np.int8 else cache
