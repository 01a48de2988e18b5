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

ISA "avx2" decodes on bytes, without the 16-bit multiply-high of the textbook decode: with
x' = x ^ 0x80 (x - 128 as a signed byte), 3x' = 3x - 128 (mod 256), so the state stays in the
signed domain under `x' <- x' + x' + x'` (two vpaddb; an empty inline asm keeps LLVM from folding
the chain into x' * 9, * 27, * 81, which costs 3 to 5 instructions each on bytes), and the digit
(3x) >> 8 = [x >= 86] + [x >= 171] = [x' > -43] + [x' > 42] is two vpcmpgtb (-1 when true)
subtracted from zero: 39 vector instructions per 160 weights (43 with the folded chain).
Codes (u8) times activations (s8) go through `vpmaddubsw` (pairs: |2 * 2 * -128| = 512); the
pairs of all five digits are added in int16 lanes for CHUNK blocks (12 * 5 * 512 = 30720 < 32767)
and only then widened into int32 lanes with one `vpmaddwd` against ones.
ISA "generic" uses plain vector IR on 16-bit lanes (t = 3x; d = t >> 8; x = t & 255).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .config import ISA

BLOCK = 160  # columns per block
BLOCK_BYTES = 32  # packed bytes per block
DIGITS = 5
CHUNK = 12  # blocks summed in int16 lanes before widening (see above)
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V32I16 = ir.VectorType(_I16, 32)


def _splat(ty: ir.VectorType, value: int) -> ir.Constant:
    return ir.Constant(ty, [value] * ty.count)


class _Avx2:
    """Byte-domain decode (vpxor / vpcmpgtb / vpsubb / vpaddb), vpmaddubsw + vpmaddwd."""

    acc_type = ir.VectorType(_I32, 8)
    pair_type = _V16I16

    @staticmethod
    def init(builder, w):
        return [builder.xor(w, _splat(_V32I8, 0x80))]

    @staticmethod
    def digit(builder, state, last):
        (x,) = state
        zero = _splat(_V32I8, 0)
        ge86 = builder.sext(builder.icmp_signed(">", x, _splat(_V32I8, -43)), _V32I8)  # 0 or -1
        ge171 = builder.sext(builder.icmp_signed(">", x, _splat(_V32I8, 42)), _V32I8)
        code = builder.sub(builder.sub(zero, ge86), ge171)
        if last:
            return code, state
        # x' + x' + x' behind an empty asm (no instruction): otherwise LLVM folds the chain into
        # x' * 9, x' * 27, x' * 81, which AVX2 lacks for bytes and emulates with 3-5 instructions
        x3 = builder.add(builder.add(x, x), x)
        return code, [builder.asm(ir.FunctionType(_V32I8, [_V32I8]), "", "=x,0", [x3], side_effect=False)]

    @staticmethod
    def product(builder, code, xv):
        mod = builder.module
        maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(_V16I16, [_V32I8, _V32I8]))
        return builder.call(maddubs, [code, xv])

    @staticmethod
    def widen(builder, pairs):
        mod = builder.module
        maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd",
                                       fnty=ir.FunctionType(_Avx2.acc_type, [_V16I16, _V16I16]))
        return builder.call(maddwd, [pairs, _splat(_V16I16, 1)])


class _Generic:
    """Plain vector IR on 16-bit lanes, for any LLVM target."""

    acc_type = ir.VectorType(_I32, 32)
    pair_type = _V32I16

    @staticmethod
    def init(builder, w):
        return [builder.zext(w, _V32I16)]

    @staticmethod
    def digit(builder, state, last):
        (x,) = state
        t = builder.mul(x, _splat(_V32I16, 3))
        code = builder.lshr(t, _splat(_V32I16, 8))  # 0, 1 or 2, kept in 16-bit lanes
        if last:
            return code, state
        return code, [builder.and_(t, _splat(_V32I16, 255))]

    @staticmethod
    def product(builder, code, xv):
        return builder.mul(code, builder.sext(xv, _V32I16))

    @staticmethod
    def widen(builder, pairs):
        return builder.sext(pairs, _Generic.acc_type)


def _load32(builder, base, off):
    return builder.load(builder.bitcast(builder.gep(base, [off]), _V32I8.as_pointer()), align=1)


def _block(isa, builder, ws, xps, x_off, acc16):
    """Decode the five digits of the 32 packed bytes of every row in `ws`, multiply digit k by the
    activation slice at x_off + 32k of every row in `xps` (each slice is loaded once and shared by
    all packed rows) and add the products to the int16 pair accumulators acc16[i * len(xps) + j]."""
    states = [isa.init(builder, w) for w in ws]
    acc16 = list(acc16)
    nt = len(xps)
    for k in range(DIGITS):
        off = builder.add(x_off, ir.Constant(_I64, BLOCK_BYTES * k)) if k else x_off
        xvs = [_load32(builder, xp, off) for xp in xps]
        for i in range(len(ws)):
            code, states[i] = isa.digit(builder, states[i], last=(k == DIGITS - 1))
            for j, xv in enumerate(xvs):
                acc16[i * nt + j] = builder.add(acc16[i * nt + j], isa.product(builder, code, xv))
    return acc16


def _hsum(builder, acc):
    total = builder.extract_element(acc, ir.Constant(_I32, 0))
    for k in range(1, acc.type.count):
        total = builder.add(total, builder.extract_element(acc, ir.Constant(_I32, k)))
    return total


def _as_i64(builder, v):
    return builder.sext(v, _I64) if v.type.width < 64 else v


def _emit(context, builder, signature, args, nr, nt):
    """IR for the nr * nt sums of packed rows args[:nr] with activation rows args[nr:nr + nt],
    in the order (row 0, x 0), (row 0, x 1), ..., (row 1, x 0), ..."""
    isa = _Avx2 if ISA == "avx2" else _Generic
    acc_t = isa.acc_type
    zero_acc = ir.Constant(acc_t, [0] * acc_t.count)
    na = nr * nt

    def data(i):
        arr = context.make_array(signature.args[i])(context, builder, args[i])
        return builder.bitcast(arr.data, _I8.as_pointer())

    pps = [data(i) for i in range(nr)]
    xps = [data(nr + j) for j in range(nt)]
    nb = _as_i64(builder, args[nr + nt])
    ndig = _as_i64(builder, args[nr + nt + 1])

    # for each chunk of up to CHUNK whole blocks: int16 sums over the chunk, then widened to int32
    pair_t = isa.pair_type
    zero16 = ir.Constant(pair_t, [0] * pair_t.count)
    pre = builder.block
    outer = builder.append_basic_block("b3.chunks")
    inner_pre = builder.append_basic_block("b3.chunk")
    inner = builder.append_basic_block("b3.blocks")
    body = builder.append_basic_block("b3.block")
    inner_done = builder.append_basic_block("b3.chunk_done")
    tail = builder.append_basic_block("b3.tail")
    tpre = builder.append_basic_block("b3.tpre")
    tloop = builder.append_basic_block("b3.tloop")
    tbody = builder.append_basic_block("b3.tbody")
    done = builder.append_basic_block("b3.done")
    builder.branch(outer)

    builder.position_at_end(outer)
    ob = builder.phi(_I64)
    accs = [builder.phi(acc_t) for _ in range(na)]
    ob.add_incoming(ir.Constant(_I64, 0), pre)
    for a in accs:
        a.add_incoming(zero_acc, pre)
    builder.cbranch(builder.icmp_signed("<", ob, nb), inner_pre, tail)

    builder.position_at_end(inner_pre)
    end = builder.add(ob, ir.Constant(_I64, CHUNK))
    end = builder.select(builder.icmp_signed("<", end, nb), end, nb)
    builder.branch(inner)

    builder.position_at_end(inner)
    idx = builder.phi(_I64)
    acc16 = [builder.phi(pair_t) for _ in range(na)]
    idx.add_incoming(ob, inner_pre)
    for a in acc16:
        a.add_incoming(zero16, inner_pre)
    builder.cbranch(builder.icmp_signed("<", idx, end), body, inner_done)

    builder.position_at_end(body)
    woff = builder.mul(idx, ir.Constant(_I64, BLOCK_BYTES))
    ws = [_load32(builder, pp, woff) for pp in pps]
    new16 = _block(isa, builder, ws, xps, builder.mul(idx, ir.Constant(_I64, BLOCK)), acc16)
    idx.add_incoming(builder.add(idx, ir.Constant(_I64, 1)), builder.block)
    for a, v in zip(acc16, new16):
        a.add_incoming(v, builder.block)
    builder.branch(inner)

    builder.position_at_end(inner_done)
    for a, a16 in zip(accs, acc16):
        a.add_incoming(builder.add(a, isa.widen(builder, a16)), inner_done)
    ob.add_incoming(end, inner_done)
    builder.branch(outer)

    # block nb, digits 0..ndig-1 (ndig < 5): a runtime loop, one digit per trip
    builder.position_at_end(tail)
    builder.cbranch(builder.icmp_signed(">", ndig, ir.Constant(_I64, 0)), tpre, done)

    builder.position_at_end(tpre)
    tw = builder.mul(nb, ir.Constant(_I64, BLOCK_BYTES))
    st0 = [isa.init(builder, _load32(builder, pp, tw)) for pp in pps]
    builder.branch(tloop)

    builder.position_at_end(tloop)
    k = builder.phi(_I64)
    st_phis = [[builder.phi(s.type) for s in st] for st in st0]
    taccs = [builder.phi(acc_t) for _ in range(na)]
    k.add_incoming(ir.Constant(_I64, 0), tpre)
    for ps, st in zip(st_phis, st0):
        for p, s in zip(ps, st):
            p.add_incoming(s, tpre)
    for p, a in zip(taccs, accs):
        p.add_incoming(a, tpre)
    builder.cbranch(builder.icmp_signed("<", k, ndig), tbody, done)

    builder.position_at_end(tbody)
    off = builder.add(builder.mul(nb, ir.Constant(_I64, BLOCK)), builder.mul(k, ir.Constant(_I64, BLOCK_BYTES)))
    xvs = [_load32(builder, xp, off) for xp in xps]
    tnew = []
    nxts = []
    for i in range(nr):
        code, nxt = isa.digit(builder, st_phis[i], last=False)
        nxts.append(nxt)
        tnew += [builder.add(taccs[i * nt + j], isa.widen(builder, isa.product(builder, code, xv)))
                 for j, xv in enumerate(xvs)]
    k.add_incoming(builder.add(k, ir.Constant(_I64, 1)), builder.block)
    for ps, nxt in zip(st_phis, nxts):
        for p, s in zip(ps, nxt):
            p.add_incoming(s, builder.block)
    for p, v in zip(taccs, tnew):
        p.add_incoming(v, builder.block)
    builder.branch(tloop)

    builder.position_at_end(done)
    phis = []
    for a, ta in zip(accs, taccs):
        phi = builder.phi(acc_t)
        phi.add_incoming(a, tail)
        phi.add_incoming(ta, tloop)
        phis.append(phi)
    return [_hsum(builder, phi) for phi in phis]


def _row_ok(t, dtype) -> bool:
    return isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and t.dtype == dtype


def _typed(nt, packed_rows, x_rows, nblocks, ndigits):
    if not (all(_row_ok(p, types.uint8) for p in packed_rows) and all(_row_ok(x, types.int8) for x in x_rows)
            and isinstance(nblocks, types.Integer) and isinstance(ndigits, types.Integer)):
        return None
    nr = len(packed_rows)
    n = nr * nt
    ret = types.int32 if n == 1 else types.UniTuple(types.int32, n)
    sig = ret(*packed_rows, *x_rows, nblocks, ndigits)

    def codegen(context, builder, signature, args):
        sums = _emit(context, builder, signature, args, nr, nt)
        return sums[0] if n == 1 else context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


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
