"""SIMD dot-product tiles over blocks of 32 columns, as LLVM IR: 2-bit packed ternary codes x int8
activations (`ternary.py`) and int8 x int8 (the int8 head, `head8.py`).

LLVM does not find `vpmaddubsw` in a Numba loop (it widens to int32 lanes and does ~25 G
multiply-adds/s here); these intrinsics emit the instruction set's own operations (`isa.py`).

`dot4_tile{1,2}(packed_row, q, t0, nblocks)` return, for tokens t0, t0 + 1, ... (token-major:
sums[4 * j + i] is output row i of token t0 + j)

    sum_c ((packed_row[c] >> 2i) & 3) * q[t, c]    for i = 0..3, c < 32 * nblocks

i.e. the code-weighted sums of the four output rows that one packed row holds. Each block of 32
columns is one 32-byte load of codes and four shift/and (once for all tokens of the tile), then per
token one load of activations and four `madd` (on AVX2 `vpmaddubsw`: u8 x s8 -> pairs in int16,
|2 * 3 * -128| fits). The pairs are added in short lanes for CHUNK blocks and only then widened.

`dot_s8_tile{1,2}(a_row, b, t0, nblocks)` return the int32 sums of a_row[c] * b[t, c] for t = t0
(, t0 + 1) over 32 * nblocks columns (int8, both in [-127, 127]); a block of a_row is loaded once
for both tokens. One value for tile1, a pair for tile2.
"""

from __future__ import annotations

from numba.extending import intrinsic

from .config import ISA
from .isa import ISAS
from .llvmir import V32I8, array_data, as_i64, chunked_sums, hsum, i64, int32_sums, load32, loop, matrix_rows, splat

BLOCK = 32  # columns per block
CHUNK = 32  # blocks summed in int16 lanes before widening: 32 * |2 * 3 * -128| = 24576 < 32767


def unpack_codes(builder, packed):
    """The four 2-bit code vectors (bits 0-1, 2-3, 4-5, 6-7) of 32 packed bytes."""
    mask = splat(V32I8, 3)
    codes = [builder.and_(packed, mask)]
    codes += [builder.and_(builder.lshr(packed, splat(V32I8, 2 * i)), mask) for i in (1, 2)]
    codes.append(builder.lshr(packed, splat(V32I8, 6)))
    return codes


def emit_dot4(builder, isa, packed, xs, nblocks):
    """4 * len(xs) int32 sums, token-major: the codes of the packed row at byte pointer `packed`
    against each activation row of `xs` (byte pointers), over `nblocks` (i64) blocks."""
    def block(idx, pairs):
        off = builder.mul(idx, i64(BLOCK))
        codes = unpack_codes(builder, load32(builder, packed, off))
        new = []
        for j, xp in enumerate(xs):
            x = load32(builder, xp, off)
            new += [isa.madd(builder, pairs[4 * j + i], codes[i], x) for i in range(4)]
        return new

    return [hsum(builder, a) for a in chunked_sums(builder, "dot4", isa, nblocks, CHUNK, 4 * len(xs), block)]


def emit_dot_s8(builder, isa, a, bs, nblocks):
    """len(bs) int32 sums of the int8 row at byte pointer `a` with each int8 row of `bs`, over
    `nblocks` (i64) blocks; one int32 accumulator per row (|2 * 127 * 127| fits one madd's pairs)."""
    zero_pairs = splat(isa.pair_type, 0)

    def block(idx, accs):
        off = builder.mul(idx, i64(BLOCK))
        av = load32(builder, a, off)
        return [builder.add(acc, isa.widen(builder, isa.madd_signed(builder, zero_pairs, av, load32(builder, b, off))))
                for acc, b in zip(accs, bs)]

    accs = loop(builder, "dot_s8", i64(0), nblocks, [splat(isa.acc_type, 0)] * len(bs), block)
    return [hsum(builder, acc) for acc in accs]


def _tile(emit, per_token: int, tokens: int):
    """A Numba intrinsic (row, matrix, t0, nblocks) -> per_token * tokens int32 sums of `emit` with
    rows t0 .. t0 + tokens - 1 of the matrix, in this process's instruction set."""
    @intrinsic
    def tile(typingctx, row, matrix, t0, nblocks):
        def sums(context, builder, signature, args):
            r = array_data(context, builder, signature.args[0], args[0])
            xs = matrix_rows(context, builder, signature.args[1], args[1], args[2], tokens)
            return emit(builder, ISAS[ISA], r, xs, as_i64(builder, args[3]))

        return int32_sums((row, matrix, t0, nblocks), per_token * tokens, sums)

    return tile


dot4_tile1 = _tile(emit_dot4, 4, 1)
dot4_tile2 = _tile(emit_dot4, 4, 2)
dot_s8_tile1 = _tile(emit_dot_s8, 1, 1)
dot_s8_tile2 = _tile(emit_dot_s8, 1, 2)
