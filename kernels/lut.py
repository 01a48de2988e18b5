"""Lookup-table (vector LUT) kernel for the 2-bit packed ternary linears, in the style of vlut.cpp
(Vec-LUT) and T-MAC: for a slice of tokens, precompute per group of COLS = 2 columns the partial sums
of every weight pattern for all those tokens at once; each output row is then a sum of table rows,
one vector load + `vpaddw` per group and vector of tokens, no multiplies.

Same inputs and outputs as `ternary.ternary_linear` (packed (R, K) uint8 in the Hugging Face
layout, q (T, K) int8, float32 or int32 out through `epilogue.store`), a different order of work:

- tables (`_build`, once per call, shared by all threads): tab[s, g, p, l] int16 is, for token l of
  slice s (L = 1 or _SLICE vectors of int16 lanes: 16 tokens per ymm, 32 per zmm; padding tokens are
  zero and never stored) and each of the 16 patterns p = c0 + 4 c1 of the 2-bit codes of columns
  2g, 2g + 1, the sum (c0 - 1) x[2g] + (c1 - 1) x[2g + 1] (code 3 reads as +2, like the reference).
  Rows are aligned to 64 bytes: a table row is one cache line, never split;
- offsets (`emit_offsets`, in vector lanes from one load of the packed bytes of a K tile): the byte
  offset of the table row of output row i * R + r in group g is ((bits 2i..2i+1 of packed[r, 2g]) +
  4 (of packed[r, 2g + 1])) * row stride + g * group stride. One packed byte holds 4 output rows of
  one column, so a group must span columns; the weights are not re-laid out;
- lookups (`emit_lut_rows`, loop over rows in the IR): for a block of _BLOCK_ROWS packed rows, a K tile
  of _GROUPS groups (its tables of one slice, 16 KiB on zmm at L = 32, stay in L1 over the block)
  and one token slice, the 4 output rows of each packed row sum their table rows in int16 registers,
  then widen once into int32 accumulators in memory. |entry| <= 2 * 2 * 128 = 512, so up to
  _MAX_GROUPS = 63 groups cannot overflow int16;
- columns past the last whole group (K odd) are added by a scalar loop.

The integer result is the exact sum(w * x), so the float32 store is bit-identical to
`ternary_linear`'s (which forms the same integer as sum(code * x) - sum(x)).

Measured, it loses to the dot-product kernels at every token count on both AVX2 and AVX-512 VNNI
(tests/tools/lut_ab.py, table in the README's "Lookup tables against dot products"): a lookup adds
2 columns x 32 tokens (zmm) per load + `vpaddw` plus a share of an offset load, where one `vpdpbusd`
adds 64 columns x 1 token, and the 2-bit codes are unpacked once for both tokens of a pair. So it is
not wired into `ternary_linear`; it stays here, exact and tested, as the measured alternative.
Groups of 3 or 4 columns (64 or 256 patterns) make fewer lookups but tables that leave L1 for L2,
and measured slower still."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .config import ISA, NJIT, NJIT_PARALLEL, njit
from .epilogue import store, unused_factors
from .isa import ISAS
from .llvmir import BYTE_PTR, I16, I32, I64, as_i64, i64, load, loop
from .ternary import _check

LANES = ISAS[ISA].width // 2  # int16 tokens per vector in this process
COLS = 2  # columns per group
PATTERNS = 4 ** COLS  # 2-bit codes of COLS columns
_MAX_GROUPS = 32767 // (COLS * 256)  # |entry| <= COLS * 2 * 128: int16 sums of a K tile cannot overflow
_GROUPS = 16  # groups per K tile: a slice's tables of a tile are 16 * 16 * L * 2 bytes (16 KiB at L = 32)
_BLOCK_ROWS = 32  # packed rows per task
_SLICE = 2  # vectors of tokens per slice when they divide the padded tokens (else 1)
assert _GROUPS <= _MAX_GROUPS


def _vec(isa) -> ir.VectorType:
    return ir.VectorType(I16, isa.width // 2)


def emit_lut_rows(builder, isa, offs, ostride, ngroups, tab, nvec: int):
    """4 * nvec int16 vectors, row-major (sums[nvec * i + k] is output row i, token vector k): over
    groups g = 0 .. ngroups - 1 (i64), the table rows at tab + offs[i][g] (i8 pointer; offs: int32
    byte offsets, row i at byte offs + i * ostride, i64)."""
    vec = _vec(isa)
    rows = [builder.bitcast(builder.gep(offs, [builder.mul(i64(i), ostride)]), I32.as_pointer()) for i in range(4)]

    def group(g, accs):
        new = []
        for i in range(4):
            off = builder.sext(builder.load(builder.gep(rows[i], [g])), I64)
            entry = builder.gep(tab, [off])
            new += [builder.add(accs[nvec * i + k], load(builder, entry, i64(k * isa.width), vec)) for k in range(nvec)]
        return new

    return loop(builder, "lut.groups", i64(0), ngroups, [ir.Constant(vec, [0] * vec.count)] * (4 * nvec), group)


def _strides(builder, arr):
    return [builder.extract_value(arr.strides, k) for k in range(arr.strides.type.count)]


def _lut_rows(nvec: int):
    """A Numba intrinsic (offs, ngroups, tab, s, g0, acc, r0, r1, t0) -> None: for rows r = r0 .. r1 - 1,
    adds to acc[r, i, t0 .. t0 + nvec * LANES - 1] (int32 (R, 4, Tp)) the `emit_lut_rows` sums with the
    offsets offs[r - r0] (int32 (B, 4, G)) into the tables tab[s, g0:] (int16 (S, groups, PATTERNS,
    slice tokens)). The loop over rows is in the IR: a Numba call per row costs more than its lookups."""
    @intrinsic
    def rows(typingctx, offs, ngroups, tab, s, g0, acc, r0, r1, t0):
        def codegen(context, builder, signature, args):
            isa = ISAS[ISA]
            of, tb, ac = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 2, 5))
            ng, s_, g0_, r0_, r1_, t0_ = (as_i64(builder, args[k]) for k in (1, 3, 4, 6, 7, 8))
            ostr, tstr, astr = (_strides(builder, a) for a in (of, tb, ac))
            tab0 = builder.gep(builder.bitcast(tb.data, BYTE_PTR), [builder.add(builder.mul(s_, tstr[0]),
                                                                              builder.mul(g0_, tstr[1]))])
            wide = ir.VectorType(I32, isa.width // 2)

            def row(r, _):
                o0 = builder.gep(builder.bitcast(of.data, BYTE_PTR), [builder.mul(builder.sub(r, r0_), ostr[0])])
                sums = emit_lut_rows(builder, isa, o0, ostr[1], ng, tab0, nvec)
                acc0 = builder.gep(builder.bitcast(ac.data, BYTE_PTR), [builder.add(builder.mul(r, astr[0]),
                                                                                  builder.mul(t0_, i64(4)))])
                for i in range(4):
                    for k in range(nvec):
                        off = builder.add(builder.mul(i64(i), astr[1]), i64(k * 2 * isa.width))
                        ptr = builder.bitcast(builder.gep(acc0, [off]), wide.as_pointer())
                        total = builder.add(builder.load(ptr, align=1), builder.sext(sums[nvec * i + k], wide))
                        builder.store(total, ptr, align=1)
                return []

            loop(builder, "lut.rows", r0_, r1_, [], row)
            return context.get_dummy_value()

        def c_array(a, dtype, ndim):
            return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"

        ok = c_array(offs, types.int32, 3) and c_array(tab, types.int16, 4) and c_array(acc, types.int32, 3)
        return (types.void(offs, ngroups, tab, s, g0, acc, r0, r1, t0), codegen) if ok else None

    return rows


def emit_offsets(builder, row, groups: int, pstride, gstride, outs):
    """Store at outs[i] (i32 pointers, i = 0..3) the `groups` int32 byte offsets pattern * pstride
    + g * gstride of output row i in groups g = 0 .. groups - 1 of the packed bytes at `row` (i8
    pointer, COLS * groups bytes): pattern = sum_j ((byte[COLS g + j] >> 2i) & 3) << 2j, in vector
    lanes (shifts, masks and stride-COLS shuffles of one load)."""
    n = COLS * groups
    bytes_ = load(builder, row, i64(0), ir.VectorType(ir.IntType(8), n))
    lanes = ir.VectorType(I32, groups)
    steps = builder.add(builder.mul(ir.Constant(lanes, list(range(groups))), _splat32(builder, gstride, groups)),
                        ir.Constant(lanes, [0] * groups))
    pstr = _splat32(builder, pstride, groups)
    for i in range(4):
        codes = builder.and_(builder.lshr(bytes_, ir.Constant(bytes_.type, [2 * i] * n)), ir.Constant(bytes_.type, [3] * n))
        pattern = None
        for j in range(COLS):
            part = builder.shuffle_vector(codes, codes, ir.Constant(ir.VectorType(I32, groups), list(range(j, n, COLS))))
            part = builder.shl(builder.zext(part, lanes), ir.Constant(lanes, [2 * j] * groups))
            pattern = part if pattern is None else builder.or_(pattern, part)
        value = builder.add(builder.mul(pattern, pstr), steps)
        builder.store(value, builder.bitcast(outs[i], lanes.as_pointer()), align=1)


def _splat32(builder, v, n):
    """The i32 vector of n lanes, each the i64 value v truncated."""
    lanes = ir.VectorType(I32, n)
    one = builder.insert_element(ir.Constant(lanes, ir.Undefined), builder.trunc(v, I32), ir.Constant(I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(I32, n), [0] * n))


def _tile_offsets(groups: int):
    """A Numba intrinsic (packed, r, c0, pstride, gstride, offs, rr) -> None: `emit_offsets` of the
    `groups` groups of packed row r from column c0 into offs[rr, i, :groups] (int32 (B, 4, G))."""
    @intrinsic
    def offsets(typingctx, packed, r, c0, pstride, gstride, offs, rr):
        def codegen(context, builder, signature, args):
            pk, of = (context.make_array(signature.args[k])(context, builder, args[k]) for k in (0, 5))
            r_, c0_, ps, gs, rr_ = (as_i64(builder, args[k]) for k in (1, 2, 3, 4, 6))
            pstr, ostr = _strides(builder, pk), _strides(builder, of)
            row = builder.gep(builder.bitcast(pk.data, BYTE_PTR), [builder.add(builder.mul(r_, pstr[0]), c0_)])
            o0 = builder.gep(builder.bitcast(of.data, BYTE_PTR), [builder.mul(rr_, ostr[0])])
            outs = [builder.gep(o0, [builder.mul(i64(i), ostr[1])]) for i in range(4)]
            emit_offsets(builder, row, groups, ps, gs, outs)
            return context.get_dummy_value()

        ok = isinstance(offs, types.Array) and offs.dtype == types.int32 and offs.ndim == 3 and offs.layout == "C"
        return (types.void(packed, r, c0, pstride, gstride, offs, rr), codegen) if ok else None

    return offsets


tile_offsets = _tile_offsets(_GROUPS)
lut_rows_slice = _lut_rows(_SLICE)
lut_rows1 = _lut_rows(1)


def slice_vectors(tokens_padded: int) -> int:
    """Vectors of tokens per slice: _SLICE when they divide the padded tokens, else 1."""
    nvec = tokens_padded // LANES
    return _SLICE if nvec % _SLICE == 0 else 1


@njit(**NJIT_PARALLEL)
def _build(q, tab):  # pragma: no cover - compiled
    """tab[s, g, p, l] = sum_j (code_j(p) - 1) * q[s * L + l, COLS * g + j] (zero past the tokens of
    q), L = tab.shape[3]: the tables of every group, token slice by token slice."""
    T = q.shape[0]
    S, ngroups, P, L = tab.shape
    for g in prange(ngroups):
        for s in range(S):
            x = np.zeros((COLS, L), dtype=np.int16)
            for j in range(COLS):
                for l in range(min(L, T - s * L)):
                    x[j, l] = q[s * L + l, COLS * g + j]
            for p in range(P):
                for l in range(L):
                    tab[s, g, p, l] = 0
                for j in range(COLS):
                    w = np.int16(((p >> (2 * j)) & 3) - 1)
                    for l in range(L):
                        tab[s, g, p, l] = np.int16(tab[s, g, p, l] + w * x[j, l])


@njit(**NJIT)
def _offsets(packed, r0, r1, c0, ng, pstride, gstride, offs):  # pragma: no cover - compiled
    """offs[r - r0, i, g] = byte offset of output row i of packed row r in group g of the tile at column
    c0: its pattern (the 2-bit fields i of bytes c0 + COLS g + j, j < COLS) * pstride + g * gstride."""
    for r in range(r0, r1):
        for i in range(4):
            sh = 2 * i
            for g in range(ng):
                p = 0
                for j in range(COLS):
                    p |= ((np.int32(packed[r, c0 + COLS * g + j]) >> sh) & 3) << (2 * j)
                offs[r - r0, i, g] = np.int32(p * pstride + g * gstride)


@njit(**NJIT_PARALLEL)
def _lut_kernel(packed, q, tab, G, B, div, mul, out):  # pragma: no cover - compiled
    """out (T, 4R) from the LUT sums of packed (R, K) with the tables tab of q (see `_build`), through
    `store` (the sums are sum(w * x) already: no activation sum to subtract)."""
    R, K = packed.shape
    T = q.shape[0]
    S, ngroups, P, L = tab.shape
    nv = L // LANES
    acc = np.zeros((R, 4, S * L), dtype=np.int32)
    nblocks = (R + B - 1) // B
    for blk in prange(nblocks):
        r0 = blk * B
        r1 = min(R, r0 + B)
        offs = np.empty((B, 4, G), dtype=np.int32)
        for g0 in range(0, ngroups, G):  # K tiles
            ng = min(G, ngroups - g0)
            if ng == G:
                for r in range(r0, r1):
                    tile_offsets(packed, r, COLS * g0, 2 * L, P * 2 * L, offs, r - r0)
            else:
                _offsets(packed, r0, r1, COLS * g0, ng, 2 * L, P * 2 * L, offs)
            for s in range(S):  # a slice's tables of the tile stay in L1 over the block's rows
                if nv == _SLICE:
                    lut_rows_slice(offs, ng, tab, s, g0, acc, r0, r1, s * L)
                else:
                    lut_rows1(offs, ng, tab, s, g0, acc, r0, r1, s * L)
        for r in range(r0, r1):
            for c in range(COLS * ngroups, K):  # the columns short of a whole group
                b = np.int32(packed[r, c])
                for i in range(4):
                    w = np.int32((b >> (2 * i)) & 3) - 1
                    for t in range(T):
                        acc[r, i, t] += w * np.int32(q[t, c])
            for i in range(4):
                for t in range(T):
                    store(out, t, i * R + r, acc[r, i, t], np.int32(0), div[t], mul)


def _aligned(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialized C array whose data starts on an `align`-byte boundary: a table row is one
    whole cache line, never split between two (a split load costs two)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + n].view(dtype).reshape(shape)


def _run(packed, q, div, mul, out):
    q = np.ascontiguousarray(q)
    _check(packed, q)
    T, K = q.shape
    Tp = -(-T // LANES) * LANES
    L = slice_vectors(Tp) * LANES
    tab = _aligned((Tp // L, K // COLS, PATTERNS, L), np.int16)  # (slices, groups, patterns, tokens)
    _build(q, tab)
    _lut_kernel(packed, q, tab, _GROUPS, _BLOCK_ROWS, div, mul, out)
    return out


def lut_matmul_ref(packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """NumPy reference of the method: int32 (T, 4R) from the tables of every group (all tokens at once)
    and the patterns read from the packed bytes, plus the scalar columns past the last whole group."""
    packed = np.asarray(packed, dtype=np.uint8)
    x = np.asarray(q, dtype=np.int64).T  # (K, T)
    R, K = packed.shape
    ngroups = K // COLS
    codes = np.stack([(packed >> (2 * i)) & 3 for i in range(4)]).astype(np.int64)  # (4, R, K): rows i * R + r
    weights = np.array([[((p >> (2 * j)) & 3) - 1 for j in range(COLS)] for p in range(PATTERNS)])  # (P, COLS)
    xg = x[:COLS * ngroups].reshape(ngroups, COLS, x.shape[1])  # (G, COLS, T)
    tables = np.einsum("pj,gjt->gpt", weights, xg)  # (G, P, T)
    shifts = 2 * np.arange(COLS)
    patterns = (codes[:, :, :COLS * ngroups].reshape(4, R, ngroups, COLS) << shifts).sum(axis=-1)  # (4, R, G)
    acc = tables[np.arange(ngroups), patterns].sum(axis=2)  # (4, R, T)
    acc += np.einsum("irc,ct->irt", codes[:, :, COLS * ngroups:] - 1, x[COLS * ngroups:])
    return acc.reshape(4 * R, -1).T.astype(np.int32)


def lut_matmul(packed: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Exact int32 (T, 4R) = q @ unpack(packed).T with the LUT kernel."""
    out = np.empty((q.shape[0], 4 * packed.shape[0]), dtype=np.int32)
    return _run(packed, q, *unused_factors(q.shape[0]), out)


def lut_linear(packed, q, qsum, div, mul, out=None) -> np.ndarray:
    """`ternary.ternary_linear` through the LUT kernel: float32 (T, 4R) = (q @ W.T) / div[:, None] * mul,
    bit for bit. qsum is not needed (the tables hold signed weights) and is accepted for the same call."""
    if out is None:
        out = np.empty((q.shape[0], 4 * packed.shape[0]), dtype=np.float32)
    return _run(packed, q, np.asarray(div, np.float32), np.float32(mul), out)
