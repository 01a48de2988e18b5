"""SIMD dot products of base-3 packed ternary codes (5 per byte) with int8 activations, in LLVM IR.

Layout (see `base3.py`): each block of 160 columns is 32 bytes; byte i holds the codes of
columns 32k + i (digit k = 0..4) as the fixed-point fraction b = ceil(v * 256 / 243) of
v = d0*81 + d1*27 + d2*9 + d3*3 + d4. Digit k is read as d_k = (x_k * 3) >> 8 with x_0 = b and
x_{k+1} = (x_k * 3) & 255, so decoding digit k of a 32-byte block gives the 32 codes of the
contiguous activation slice x[32k : 32k + 32] of that block.

`dot_base3_{1,2,4,8}(packed_row, x_row..., nblocks, ndigits)` return the int32 sums

    sum_c code(c) * x_row[c]    over the 160 * nblocks columns of the whole blocks, then over
                                the first 32 * ndigits columns of block `nblocks` (ndigits < 5)

for 1, 2, 4 or 8 activation rows that share one decode of the packed row. For batch 1,
`dot_base3_rows{2,4}(packed_row..., x0, nblocks, ndigits)` return the same sums of 2 or 4 packed
rows with one activation row: each 32-byte activation load serves every packed row, and the
independent decode chains of the rows interleave. The caller does the remaining (< 32) columns in
scalar code.

The instruction set's strategy (`isa.py`) decodes the digits (`base3_start`, `base3_digit`) and
multiplies codes (u8) by activations (s8) into short pairs (`madd`; on AVX2 `vpmaddubsw`:
|2 * 2 * -128| = 512); the pairs of all five digits are added in int16 lanes for CHUNK blocks
(12 * 5 * 512 = 30720 < 32767) and only then widened into int32 lanes (`widen`).
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from .config import ISA
from .isa import ISAS
from .llvmir import array_data, as_i64, chunked_sums, hsum, i64, int32_sums, load32, loop, splat

BLOCK = 160  # columns per block
BLOCK_BYTES = 32  # packed bytes per block
DIGITS = 5
CHUNK = 12  # blocks summed in int16 lanes before widening (see above)


def _block(isa, builder, ws, xps, x_off, pairs):
    """Decode the five digits of the 32 packed bytes of every row in `ws`, multiply digit k by the
    activation slice at x_off + 32k of every row in `xps` (each slice is loaded once and shared by
    all packed rows) and add the products to the short accumulators pairs[i * len(xps) + j]."""
    states = [isa.base3_start(builder, w) for w in ws]
    pairs = list(pairs)
    nt = len(xps)
    for k in range(DIGITS):
        off = builder.add(x_off, i64(BLOCK_BYTES * k)) if k else x_off
        xvs = [load32(builder, xp, off) for xp in xps]
        for i in range(len(ws)):
            code, states[i] = isa.base3_digit(builder, states[i], last=(k == DIGITS - 1))
            for j, xv in enumerate(xvs):
                pairs[i * nt + j] = isa.madd(builder, pairs[i * nt + j], code, xv)
    return pairs


def emit_dot_base3(builder, isa, packed, xs, nblocks, ndigits):
    """The len(packed) * len(xs) int32 sums of the packed rows (byte pointers) with the activation
    rows `xs` (byte pointers), in the order (row 0, x 0), (row 0, x 1), ..., (row 1, x 0), ...: over
    `nblocks` whole blocks, then digits 0 .. ndigits - 1 (ndigits < 5) of block `nblocks` (i64)."""
    nr, nt = len(packed), len(xs)

    def block(idx, pairs):
        ws = [load32(builder, p, builder.mul(idx, i64(BLOCK_BYTES))) for p in packed]
        return _block(isa, builder, ws, xs, builder.mul(idx, i64(BLOCK)), pairs)

    accs = chunked_sums(builder, "b3", isa, nblocks, CHUNK, nr * nt, block)

    # block nblocks, digits 0 .. ndigits - 1: a runtime loop, one digit per trip; guarded, as a row
    # whose length is a multiple of 160 has no bytes there
    whole = builder.block
    with builder.if_then(builder.icmp_signed(">", ndigits, i64(0))):
        tw = builder.mul(nblocks, i64(BLOCK_BYTES))
        states = [isa.base3_start(builder, load32(builder, p, tw)) for p in packed]
        widths = [len(st) for st in states]  # decode state values per packed row
        nstate = sum(widths)
        zero_pairs = splat(isa.pair_type, 0)

        def digit(k, values):  # values: the decode states of all rows, then the accumulators
            off = builder.add(builder.mul(nblocks, i64(BLOCK)), builder.mul(k, i64(BLOCK_BYTES)))
            xvs = [load32(builder, xp, off) for xp in xs]
            new_states, new_accs, at = [], [], 0
            for i, width in enumerate(widths):
                code, nxt = isa.base3_digit(builder, values[at:at + width], last=False)
                at += width
                new_states += nxt
                for j, xv in enumerate(xvs):
                    product = isa.widen(builder, isa.madd(builder, zero_pairs, code, xv))
                    new_accs.append(builder.add(values[nstate + i * nt + j], product))
            return new_states + new_accs

        flat_states = [v for st in states for v in st]
        tail_accs = loop(builder, "b3.tail", i64(0), ndigits, flat_states + accs, digit)[nstate:]
        tail = builder.block
    phis = [builder.phi(a.type) for a in accs]
    for phi, a, ta in zip(phis, accs, tail_accs):
        phi.add_incoming(a, whole)
        phi.add_incoming(ta, tail)
    return [hsum(builder, phi) for phi in phis]


def _row_ok(t, dtype) -> bool:
    return isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype == dtype


def _typed(nt, packed_rows, x_rows, nblocks, ndigits):
    if not (all(_row_ok(p, types.uint8) for p in packed_rows) and all(_row_ok(x, types.int8) for x in x_rows)
            and isinstance(nblocks, types.Integer) and isinstance(ndigits, types.Integer)):
        return None
    nr = len(packed_rows)
    argtypes = (*packed_rows, *x_rows, nblocks, ndigits)

    def sums(context, builder, signature, args):
        rows = [array_data(context, builder, signature.args[i], args[i]) for i in range(nr + nt)]
        nb, nd = (as_i64(builder, v) for v in args[nr + nt:])
        return emit_dot_base3(builder, ISAS[ISA], rows[:nr], rows[nr:], nb, nd)

    return int32_sums(argtypes, nr * nt, sums)


@intrinsic
def dot_base3_1(typingctx, packed_row, x0, nblocks, ndigits):
    """int32 sum of codes * x0 (C-contiguous uint8 / int8 rows)."""
    return _typed(1, (packed_row,), (x0,), nblocks, ndigits)


@intrinsic
def dot_base3_2(typingctx, packed_row, x0, x1, nblocks, ndigits):
    """Two int32 sums (rows x0, x1) from one decode of packed_row."""
    return _typed(2, (packed_row,), (x0, x1), nblocks, ndigits)


@intrinsic
def dot_base3_4(typingctx, packed_row, x0, x1, x2, x3, nblocks, ndigits):
    """Four int32 sums (rows x0..x3) from one decode of packed_row."""
    return _typed(4, (packed_row,), (x0, x1, x2, x3), nblocks, ndigits)


@intrinsic
def dot_base3_8(typingctx, packed_row, x0, x1, x2, x3, x4, x5, x6, x7, nblocks, ndigits):
    """Eight int32 sums (rows x0..x7) from one decode of packed_row."""
    return _typed(8, (packed_row,), (x0, x1, x2, x3, x4, x5, x6, x7), nblocks, ndigits)


@intrinsic
def dot_base3_rows2(typingctx, packed_row0, packed_row1, x0, nblocks, ndigits):
    """Two int32 sums (packed rows 0, 1 with x0): batch 1, each activation load serves both rows."""
    return _typed(1, (packed_row0, packed_row1), (x0,), nblocks, ndigits)


@intrinsic
def dot_base3_rows4(typingctx, packed_row0, packed_row1, packed_row2, packed_row3, x0, nblocks, ndigits):
    """Four int32 sums (packed rows 0..3 with x0)."""
    return _typed(1, (packed_row0, packed_row1, packed_row2, packed_row3), (x0,), nblocks, ndigits)
