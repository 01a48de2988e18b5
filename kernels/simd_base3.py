"""SIMD dot products of base-3 packed ternary codes (5 per byte) with int8 activations, in LLVM IR.

Layout (see `base3.py`): each block of 160 columns is 32 bytes; byte i holds the codes of
columns 32k + i (digit k = 0..4) as the fixed-point fraction b = ceil(v * 256 / 243) of
v = d0*81 + d1*27 + d2*9 + d3*3 + d4. Digit k is read as d_k = (x_k * 3) >> 8 with x_0 = b and
x_{k+1} = (x_k * 3) & 255, so decoding digit k of a 32-byte block gives the 32 codes of the
contiguous activation slice x[32k : 32k + 32] of that block.

`dot_base3_{1,2,4,8}(packed_row, x_row..., nblocks, ndigits)` return the int32 sums

    sum_c code(c) * x_row[c]    over the 160 * nblocks columns of the whole blocks, then over
                                the first 32 * ndigits columns of block `nblocks` (ndigits < 5)

for 1, 2, 4 or 8 activation rows that share one decode of the packed row; the rows are given in
this process's grouped layout (below; the identity unless GROUP > 1). For batch 1,
`dot_base3_rows{2,4}(packed_row..., x0, nblocks, ndigits)` return the same sums of 2 or 4 packed
rows with one activation row: each 32-byte activation load serves every packed row, and the
independent decode chains of the rows interleave. The caller does the remaining (< 32) columns in
scalar code.

The instruction set's strategy (`isa.py`) decodes the digits (`base3_start`, `base3_digit`) and
multiplies codes (u8) by activations (s8) into short pairs (`madd`; on AVX2 `vpmaddubsw`:
|2 * 2 * -128| = 512); the pairs of all five digits are added in int16 lanes for CHUNK blocks
(12 * 5 * 512 = 30720 < 32767) and only then widened into int32 lanes (`widen`). On VNNI
(`vpdpbusd`) the products go straight into int32 lanes.

A 64-byte vector (zmm) holds two consecutive blocks: one load of packed bytes, and per digit the
two 32-byte activation slices of those blocks, which lie 160 columns apart in a row. Joining them
costs a `vinserti64x4` per digit and token (port 5, beside `vpdpbusd` zmm on port 0, and the decode
needs both ports): with it the zmm kernel ran no faster than ymm VNNI at 8-64 tokens. So the
kernel lays the activations out once per call in the grouped layout (`base3.group_digits`): for
each pair of whole blocks, the 64 columns of digit k of both blocks are contiguous, and one load
fills the vector. The emitters read activation rows in that layout wherever a vector holds
GROUP > 1 blocks (pairs of whole blocks); an odd last block and the digits of the last, partial
block read the row's own columns, which the grouped layout leaves in place.
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from .config import ISA
from .isa import ISAS
from .llvmir import V32I8, array_data, as_i64, block_sums, concat, hsum, i64, int32_sums, load, load32, loop, prefetch, splat

BLOCK = 160  # columns per block
BLOCK_BYTES = 32  # packed bytes per block
DIGITS = 5
CHUNK = 12  # vectors of blocks summed in int16 lanes before widening (see above)
GROUP = ISAS[ISA].width // BLOCK_BYTES  # layout blocks per vector in this process (1, or 2 on zmm)


def _vector(builder, isa, ptr, offs):
    """One vector of the strategy's width from the 32-byte blocks at byte offsets `offs` of ptr (one
    per 32 lanes; None: zero bytes, which decode to code 0 and multiply to 0)."""
    zero = splat(V32I8, 0)
    parts = [zero if off is None else load32(builder, ptr, off) for off in offs]
    assert len(parts) * BLOCK_BYTES == isa.width, (len(parts), isa.width)
    return concat(builder, parts)


def _span(isa, builder, packed, xs, b0, present: int, pairs):
    """Add the products of the layout blocks b0 .. b0 + present - 1 (i64 b0; one vector holds
    isa.width // 32 blocks, lanes past `present` are zero) to the short accumulators
    pairs[i * len(xs) + j] (packed row i, activation row j): the five digits of each packed row are
    decoded once for every activation row, and each activation vector is loaded once for all
    packed rows. A full vector of several blocks reads its activations in the grouped layout (one
    load per digit, see `group_digits`); a part-filled one reads the row's own layout."""
    per_vector = isa.width // BLOCK_BYTES  # layout blocks per vector
    blocks = [builder.add(b0, i64(b)) if b else b0 for b in range(present)] + [None] * (per_vector - present)
    ws = [_vector(builder, isa, p, [None if b is None else builder.mul(b, i64(BLOCK_BYTES)) for b in blocks])
          for p in packed]
    for p in packed:
        prefetch(builder, p, builder.mul(b0, i64(BLOCK_BYTES)))
    states = [isa.base3_start(builder, w) for w in ws]
    x_offs = [None if b is None else builder.mul(b, i64(BLOCK)) for b in blocks]
    pairs = list(pairs)
    nt = len(xs)
    for k in range(DIGITS):
        if present > 1:  # grouped: digit k of the blocks b0, b0 + 1, ... is one vector at 160 b0 + width k
            off = builder.add(x_offs[0], i64(isa.width * k))
            xvs = [load(builder, xp, off, isa.byte_type) for xp in xs]
        else:
            offs = [None if o is None else builder.add(o, i64(BLOCK_BYTES * k)) for o in x_offs]
            xvs = [_vector(builder, isa, xp, offs) for xp in xs]
        for i in range(len(ws)):
            code, states[i] = isa.base3_digit(builder, states[i], last=(k == DIGITS - 1))
            for j, xv in enumerate(xvs):
                pairs[i * nt + j] = isa.madd(builder, pairs[i * nt + j], code, xv)
    return pairs


def _guarded(builder, cond, values, body):
    """`values`, or `body(values)` (emitted in a branch) when the i1 `cond` holds: the phis."""
    before = builder.block
    with builder.if_then(cond):
        new = body(values)
        after = builder.block
    phis = [builder.phi(v.type) for v in values]
    for phi, v, n in zip(phis, values, new):
        phi.add_incoming(v, before)
        phi.add_incoming(n, after)
    return phis


def emit_dot_base3(builder, isa, packed, xs, nblocks, ndigits):
    """The len(packed) * len(xs) int32 sums of the packed rows (byte pointers) with the activation
    rows `xs` (byte pointers), in the order (row 0, x 0), (row 0, x 1), ..., (row 1, x 0), ...: over
    `nblocks` whole blocks, then digits 0 .. ndigits - 1 (ndigits < 5) of block `nblocks` (i64).

    A vector of 64 bytes (zmm) holds two layout blocks: the whole blocks go two at a time (their
    activations in the grouped layout), an odd last one and the digits of block `nblocks` with the
    upper half zero."""
    nr, nt = len(packed), len(xs)
    per_vector = isa.width // BLOCK_BYTES
    if per_vector not in (1, 2):
        raise ValueError(f"base-3 kernels take vectors of 32 or 64 bytes, not {isa.width}")
    zero_pairs = splat(isa.pair_type, 0)

    def span(idx, pairs):
        return _span(isa, builder, packed, xs, builder.mul(idx, i64(per_vector)), per_vector, pairs)

    spans = builder.sdiv(nblocks, i64(per_vector)) if per_vector > 1 else nblocks
    accs = block_sums(builder, "b3", isa, spans, nr * nt, span, CHUNK)

    if per_vector == 2:  # an odd last whole block
        def last_block(values):
            pairs = _span(isa, builder, packed, xs, builder.sub(nblocks, i64(1)), 1, [zero_pairs] * len(values))
            return [builder.add(a, isa.widen(builder, p)) for a, p in zip(values, pairs)]

        odd = builder.icmp_signed("!=", builder.and_(nblocks, i64(1)), i64(0))
        accs = _guarded(builder, odd, accs, last_block)

    # block nblocks, digits 0 .. ndigits - 1: a runtime loop, one digit per trip; guarded, as a row
    # whose length is a multiple of 160 has no bytes there
    def digits(values):
        tw = builder.mul(nblocks, i64(BLOCK_BYTES))
        states = [isa.base3_start(builder, _vector(builder, isa, p, [tw] + [None] * (per_vector - 1))) for p in packed]
        widths = [len(st) for st in states]  # decode state values per packed row
        nstate = sum(widths)

        def digit(k, carried):  # carried: the decode states of all rows, then the accumulators
            off = builder.add(builder.mul(nblocks, i64(BLOCK)), builder.mul(k, i64(BLOCK_BYTES)))
            xvs = [_vector(builder, isa, xp, [off] + [None] * (per_vector - 1)) for xp in xs]
            new_states, new_accs, at = [], [], 0
            for i, width in enumerate(widths):
                code, nxt = isa.base3_digit(builder, carried[at:at + width], last=False)
                at += width
                new_states += nxt
                new_accs += [isa.madd_wide(builder, carried[nstate + i * nt + j], code, xv) for j, xv in enumerate(xvs)]
            return new_states + new_accs

        flat_states = [v for st in states for v in st]
        return loop(builder, "b3.tail", i64(0), ndigits, flat_states + values, digit)[nstate:]

    accs = _guarded(builder, builder.icmp_signed(">", ndigits, i64(0)), accs, digits)
    return [hsum(builder, a) for a in accs]


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
