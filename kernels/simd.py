"""SIMD dot-product tiles over blocks of BLOCK columns (one vector: 32, or 64 on zmm), as LLVM IR:
2-bit packed ternary codes x int8 activations (`ternary.py`) and int8 x int8 (the int8 head,
`head8.py`).

LLVM does not find `vpmaddubsw` in a Numba loop (it widens to int32 lanes and does ~25 G
multiply-adds/s here); these intrinsics emit the instruction set's own operations (`isa.py`).

`dot4_tile{1,2}(packed_row, q, t0, nblocks)` return, for tokens t0, t0 + 1, ... (token-major:
sums[4 * j + i] is output row i of token t0 + j)

    sum_c ((packed_row[c] >> 2i) & 3) * q[t, c]    for i = 0..3, c < BLOCK * nblocks

i.e. the code-weighted sums of the four output rows that one packed row holds, over BLOCK *
nblocks columns. Each block is one vector load of codes and four shift/and (once for all tokens of
the tile), then per token one load of activations and four `madd` (on AVX2 `vpmaddubsw`: u8 x s8
-> pairs in int16, |2 * 3 * -128| fits; the pairs are added in short lanes for CHUNK blocks and only
then widened; on VNNI `vpdpbusd` straight into int32 lanes).

`dot_s8_tile{1,2}(a_row, b, bsum, t0, nblocks)` return the int32 sums of a_row[c] * b[t, c] for
t = t0 (, t0 + 1) over BLOCK * nblocks columns (int8, both in [-127, 127]); a block of a_row is
loaded once for both tokens. bsum[t] must be the sum of b[t] over those columns (int32): VNNI
multiplies a + 128 as an unsigned byte and subtracts 128 * bsum[t] (the strategy's
`signed_offset`). One value for tile1, a pair for tile2.

BLOCK, the columns per block, is the vector width of this process's instruction set (`config.ISA`).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .config import ISA
from .isa import ISAS
from .llvmir import I32, array_data, array_items, as_i64, block_sums, hsum, i64, int32_sums, load, matrix_rows, prefetch, splat

BLOCK = ISAS[ISA].width  # columns per block in this process
MAX_COLS = 1 << 17  # 64 * 2 * 128 * K < 2**31: the in-place top field's sums (`emit_dot4`) fit int32
CHUNK = 32  # blocks summed in int16 lanes before widening: 32 * |2 * 3 * -128| = 24576 < 32767


def unpack_codes(builder, packed):
    """The four 2-bit code vectors (bits 0-1, 2-3, 4-5, 6-7) of a vector of packed bytes."""
    mask = splat(packed.type, 3)
    codes = [builder.and_(packed, mask)]
    codes += [builder.and_(builder.lshr(packed, splat(packed.type, 2 * i)), mask) for i in (1, 2)]
    codes.append(builder.lshr(packed, splat(packed.type, 6)))
    return codes


def masked_codes(builder, packed):
    """The four 2-bit fields of a vector of packed bytes left in place (field i is 4**i times its
    code): one AND each, where shifting them down takes a shift or a GF(2) affine op each on the port
    that `vpdpbusd` needs. Only for madds into int32 lanes (the sums are 4**i times too large; a
    field of 128 would saturate 16-bit pairs)."""
    return [builder.and_(packed, splat(packed.type, 3 << (2 * i))) for i in range(4)]


def emit_dot4(builder, isa, packed, xs, nblocks):
    """4 * len(xs) int32 sums, token-major: the codes of the packed row at byte pointer `packed`
    against each activation row of `xs` (byte pointers), over `nblocks` (i64) blocks.

    Without short lanes (VNNI) the fields are masked in place (`masked_codes`) and each sum is shifted
    down by 2i at the end, exactly (4**i divides it); |4**3 * sum| < 2**31 needs rows of fewer than
    MAX_COLS columns (`ternary._check`)."""
    vec = isa.byte_type
    fields = unpack_codes if isa.short_pairs else masked_codes

    def block(idx, pairs):
        off = builder.mul(idx, i64(isa.width))
        prefetch(builder, packed, off)
        codes = fields(builder, load(builder, packed, off, vec))
        new = []
        for j, xp in enumerate(xs):
            x = load(builder, xp, off, vec)
            new += [isa.madd(builder, pairs[4 * j + i], codes[i], x) for i in range(4)]
        return new

    sums = [hsum(builder, a) for a in block_sums(builder, "dot4", isa, nblocks, 4 * len(xs), block, CHUNK)]
    if isa.short_pairs:
        return sums
    return [builder.ashr(v, ir.Constant(I32, 2 * (k % 4))) for k, v in enumerate(sums)]


def emit_dot_s8(builder, isa, a, bs, bsums, nblocks):
    """len(bs) int32 sums of the int8 row at byte pointer `a` with each int8 row of `bs`, over
    `nblocks` (i64) blocks; one int32 accumulator per row (|2 * 127 * 127| fits one madd's pairs).
    `bsums` (i32 values) are the sums of the rows of `bs` over those columns, for the strategy's
    `signed_offset`."""
    vec = isa.byte_type

    def block(idx, accs):
        off = builder.mul(idx, i64(isa.width))
        av = load(builder, a, off, vec)
        return [isa.madd_wide(builder, acc, av, load(builder, b, off, vec), signed=True) for acc, b in zip(accs, bs)]

    accs = block_sums(builder, "dot_s8", isa, nblocks, len(bs), block)
    offset = ir.Constant(I32, isa.signed_offset)
    return [builder.sub(hsum(builder, acc), builder.mul(offset, s)) for acc, s in zip(accs, bsums)]


def _dot4_tile(tokens: int):
    """A Numba intrinsic (packed_row, q, t0, nblocks) -> the 4 * tokens int32 sums of `emit_dot4`
    with rows t0 .. t0 + tokens - 1 of q, in this process's instruction set."""
    @intrinsic
    def tile(typingctx, row, matrix, t0, nblocks):
        def sums(context, builder, signature, args):
            r = array_data(context, builder, signature.args[0], args[0])
            xs = matrix_rows(context, builder, signature.args[1], args[1], args[2], tokens)
            return emit_dot4(builder, ISAS[ISA], r, xs, as_i64(builder, args[3]))

        return int32_sums((row, matrix, t0, nblocks), 4 * tokens, sums)

    return tile


def _dot_s8_tile(tokens: int):
    """A Numba intrinsic (a_row, b, bsum, t0, nblocks) -> the `tokens` int32 sums of `emit_dot_s8`
    with rows t0 .. t0 + tokens - 1 of b (bsum: their int32 sums over the blocks)."""
    @intrinsic
    def tile(typingctx, row, matrix, bsum, t0, nblocks):
        if not (isinstance(bsum, types.Array) and bsum.ndim == 1 and bsum.layout == "C" and bsum.dtype == types.int32):
            return None

        def sums(context, builder, signature, args):
            a = array_data(context, builder, signature.args[0], args[0])
            bs = matrix_rows(context, builder, signature.args[1], args[1], args[3], tokens)
            totals = array_items(context, builder, signature.args[2], args[2], args[3], tokens)
            return emit_dot_s8(builder, ISAS[ISA], a, bs, totals, as_i64(builder, args[4]))

        return int32_sums((row, matrix, bsum, t0, nblocks), tokens, sums)

    return tile


dot4_tile1 = _dot4_tile(1)
dot4_tile2 = _dot4_tile(2)
dot_s8_tile1 = _dot_s8_tile(1)
dot_s8_tile2 = _dot_s8_tile(2)
