"""RMSNorm, alone or fused with the int8 activation quantization of the linear that reads it.

Every ternary linear of a BitNet layer reads a normed, quantized input (input_layernorm before q/k/v,
attn_sub_norm before o_proj, post_attention_layernorm before gate/up, ffn_sub_norm before down_proj),
and the last one's input is relu(gate)**2 * up. `norm_quantize` does all of it in one pass over each row,
so neither the normed nor the gated row is written out; `rms_norm` gives the normed rows (the final norm
before the output head).

Per row v (float32): var = sum(v**2) / K, accumulated in float64 (squares of float32 values are exact
in float64) in 8 lanes (lane j sums the columns k = j mod 8 in order, then
((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))) and rounded to float32; then, in float32 as
transformers computes it, y = weight * (v * (1 / sqrt(var + eps))). The NumPy references below sum in
that same order, so the kernels match them bit for bit. A few rows run on the calling thread: waking
the other threads costs more than the work (`PARALLEL_ELEMENTS`).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .config import NJIT, NJIT_PARALLEL, njit
from .llvmir import array_data, as_i64, i64, load, loop
from .quantize import quantize_row, quantize_rows_ref

LANES = 8
# rows x columns from which the rows are split across threads; below, one thread does them all
# (one row of 2560 takes ~2 us, a parallel call's wake-up of a waiting thread tens of us)
PARALLEL_ELEMENTS = 1 << 16


_F32S, _F64S = ir.VectorType(ir.FloatType(), LANES), ir.VectorType(ir.DoubleType(), LANES)


@intrinsic
def _square_lanes(typingctx, row, blocks):
    """(l0, ..., l7): lane j is the sum, in column order, of the float64 squares of the float32 row's
    columns 8i + j for i < blocks. One <8 x double> accumulator: LLVM keeps a scalar loop's float sums
    in order (no reassociation without fast-math), so it would not vectorize them itself."""
    ret = types.UniTuple(types.float64, LANES)

    def codegen(context, builder, signature, args):
        base = array_data(context, builder, signature.args[0], args[0])

        def block(i, accs):
            v = builder.fpext(load(builder, base, builder.mul(i, i64(4 * LANES)), _F32S), _F64S)
            return [builder.fadd(accs[0], builder.fmul(v, v))]

        (acc,) = loop(builder, "squares", i64(0), as_i64(builder, args[1]), [ir.Constant(_F64S, [0.0] * LANES)], block)
        return context.make_tuple(builder, ret, [builder.extract_element(acc, i64(j)) for j in range(LANES)])

    return ret(row, blocks), codegen


def _gated_ref(x: np.ndarray, gate: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if gate is None:
        return x
    g = np.maximum(np.asarray(gate, np.float32), np.float32(0.0))
    return np.square(g) * x


def rms_norm_ref(x: np.ndarray, weight: np.ndarray, eps: float, gate: np.ndarray | None = None) -> np.ndarray:
    """NumPy reference: x (T, K) float32 (times relu(gate)**2 if given) -> RMS-normed (T, K) float32."""
    v = _gated_ref(x, gate)
    T, K = v.shape
    sq = np.square(v.astype(np.float64))
    sq = np.concatenate((sq, np.zeros((T, -K % LANES))), axis=1).reshape(T, -1, LANES)
    lane = np.cumsum(sq, axis=1)[:, -1, :] if sq.shape[1] else np.zeros((T, LANES))  # in order, per lane
    ss = ((lane[:, 0] + lane[:, 1]) + (lane[:, 2] + lane[:, 3])) + ((lane[:, 4] + lane[:, 5]) + (lane[:, 6] + lane[:, 7]))
    var = (ss / K).astype(np.float32)[:, None]
    inv = np.float32(1.0) / np.sqrt(var + np.float32(eps))
    return np.asarray(weight, np.float32) * (v * inv)


def norm_quantize_ref(x, weight, eps, gate=None):
    """NumPy reference for `norm_quantize`: q (T, K) int8, qsum (T,) int32, scale (T,) float32."""
    return quantize_rows_ref(rms_norm_ref(x, weight, eps, gate))


@njit(**NJIT)
def _norm_row(x, gate, gated, weight, eps, t, y):  # pragma: no cover - compiled
    """y (K,) = the RMS-normed row t of x (times relu(gate[t])**2 when gated)."""
    K = x.shape[1]
    for k in range(K):
        v = x[t, k]
        if gated:
            g = max(gate[t, k], np.float32(0.0))
            v = (g * g) * v
        y[k] = v
    main = K - K % LANES
    a0, a1, a2, a3, a4, a5, a6, a7 = _square_lanes(y, main // LANES)
    rest = np.zeros(LANES, np.float32)  # the last columns, each at its lane, then zeros (exact to add)
    rest[:K - main] = y[main:]
    b = _square_lanes(rest, 1)
    l0, l1, l2, l3 = a0 + b[0], a1 + b[1], a2 + b[2], a3 + b[3]
    l4, l5, l6, l7 = a4 + b[4], a5 + b[5], a6 + b[6], a7 + b[7]
    ss = ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))
    var = np.float32(ss / K)
    inv = np.float32(1.0) / np.sqrt(var + eps)
    for k in range(K):
        y[k] = weight[k] * (y[k] * inv)


@njit(**NJIT)
def _rows_serial(x, gate, gated, weight, eps, out, q, qsum, scale, quantize):  # pragma: no cover - compiled
    for t in range(x.shape[0]):
        _norm_row(x, gate, gated, weight, eps, t, out[t])
        if quantize:
            quantize_row(out[t], t, q, qsum, scale)


@njit(**NJIT_PARALLEL)
def _rows_parallel(x, gate, gated, weight, eps, out, q, qsum, scale, quantize):  # pragma: no cover - compiled
    for t in prange(x.shape[0]):
        _norm_row(x, gate, gated, weight, eps, t, out[t])
        if quantize:
            quantize_row(out[t], t, q, qsum, scale)


def _norm(x, weight, eps, gate, quantize: bool):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D (tokens, features) array, got shape {x.shape}")
    T, K = x.shape
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.shape != (K,):
        raise ValueError(f"norm weight must have shape ({K},), got {weight.shape}")
    gated = gate is not None
    gate = np.ascontiguousarray(gate, dtype=np.float32) if gated else x
    if gate.shape != x.shape:
        raise ValueError(f"gate must have the shape of x {x.shape}, got {gate.shape}")
    out = np.empty((T, K), np.float32)
    q = np.empty((T, K) if quantize else (0, K), np.int8)
    qsum, scale = np.empty(T, np.int32), np.empty(T, np.float32)
    run = _rows_parallel if T * K >= PARALLEL_ELEMENTS else _rows_serial
    run(x, gate, gated, weight, np.float32(eps), out, q, qsum, scale, quantize)
    return out, q, qsum, scale


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, gate: np.ndarray | None = None) -> np.ndarray:
    """RMS-normed x (T, K) float32 (times relu(gate)**2 first, if given); bit for bit `rms_norm_ref`."""
    return _norm(x, weight, eps, gate, False)[0]


def norm_quantize(x: np.ndarray, weight: np.ndarray, eps: float, gate: np.ndarray | None = None):
    """`quantize_rows(rms_norm(x, weight, eps, gate))` in one pass: q (T, K) int8, qsum (T,) int32,
    scale (T,) float32; bit for bit `norm_quantize_ref`."""
    _, q, qsum, scale = _norm(x, weight, eps, gate, True)
    return q, qsum, scale
