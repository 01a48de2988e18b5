"""SIMD dot products of 2-bit packed ternary codes with int8 activations, written in LLVM IR.

LLVM does not find `vpmaddubsw` in a Numba loop (it widens to int32 lanes
and does ~25 G multiply-adds/s here); these intrinsics emit it directly.
`dot4_tile{1,2}(packed_row, q, t0, nblocks)` return, for tokens t0, t0 + 1, ...

    sum_c ((packed_row[c] >> 2i) & 3) * q[t, c]    for i = 0..3, c < 32 * nblocks

i.e. the code-weighted sums of the four output rows that one packed row
holds. With ISA "avx2" each block of 32 columns is one 32-byte load of
codes, four shift/and (once for all tokens of the tile), then per token one
load of activations and four `vpmaddubsw` (u8 x s8 -> pairs in i16; |2*3*128|
fits). The pairs are added in int16 lanes for CHUNK blocks and only then
widened with `vpmaddwd`. With ISA "generic" the same sums are built from
plain vector IR that any x86-64 CPU (and LLVM target) can run.
`emit_block_loop` is the simpler one-accumulator-per-block loop the int8
head uses.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .config import ISA

BLOCK = 32
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8 = ir.VectorType(_I8, 32)


def emit_block_loop(context, builder, signature, args, tokens: int, lanes: int, step):
    """Emit `for i in range(nblocks)` over a row `a` and rows t0 .. t0 + tokens - 1 of a matrix `b`
    (args: a_row, b, t0, nblocks), 32 bytes at a time, with one vector accumulator of `lanes` int32
    per token; `step(builder, a_block, b_block, acc) -> new acc`, where `a_block` is loaded once per
    block for all tokens. Returns the horizontal sums of the accumulators (int32 values)."""
    a_arr = context.make_array(signature.args[0])(context, builder, args[0])
    b_arr = context.make_array(signature.args[1])(context, builder, args[1])
    ap = builder.bitcast(a_arr.data, _I8.as_pointer())
    bp = builder.bitcast(b_arr.data, _I8.as_pointer())
    stride = builder.extract_value(b_arr.strides, 0)
    t0, n = (builder.sext(v, _I64) if v.type.width < 64 else v for v in (args[2], args[3]))
    rows = [builder.gep(bp, [builder.mul(builder.add(t0, ir.Constant(_I64, j)), stride)]) for j in range(tokens)]
    acc_t = ir.VectorType(_I32, lanes)

    pre = builder.block
    loop = builder.append_basic_block("blocks.loop")
    body = builder.append_basic_block("blocks.body")
    done = builder.append_basic_block("blocks.done")
    builder.branch(loop)

    builder.position_at_end(loop)
    idx = builder.phi(_I64)
    accs = [builder.phi(acc_t) for _ in range(tokens)]
    idx.add_incoming(ir.Constant(_I64, 0), pre)
    for acc in accs:
        acc.add_incoming(ir.Constant(acc_t, [0] * lanes), pre)
    builder.cbranch(builder.icmp_signed("<", idx, n), body, done)

    builder.position_at_end(body)
    off = builder.mul(idx, ir.Constant(_I64, BLOCK))
    a = builder.load(builder.bitcast(builder.gep(ap, [off]), _V32I8.as_pointer()), align=1)
    new = []
    for row, acc in zip(rows, accs):
        b = builder.load(builder.bitcast(builder.gep(row, [off]), _V32I8.as_pointer()), align=1)
        new.append(step(builder, a, b, acc))
    idx.add_incoming(builder.add(idx, ir.Constant(_I64, 1)), builder.block)
    for acc, v in zip(accs, new):
        acc.add_incoming(v, builder.block)
    builder.branch(loop)

    builder.position_at_end(done)
    return [_hsum(builder, acc, lanes) for acc in accs]


CHUNK = 32  # blocks summed in int16 lanes before widening: 32 * |2 * 3 * -128| = 24576 < 32767


def _unpack_codes(builder, packed):
    mask = ir.Constant(_V32I8, [3] * 32)
    codes = [builder.and_(packed, mask)]
    codes += [builder.and_(builder.lshr(packed, ir.Constant(_V32I8, [2 * i] * 32)), mask) for i in (1, 2)]
    codes.append(builder.lshr(packed, ir.Constant(_V32I8, [6] * 32)))
    return codes


def _pairs16(builder, codes, x):
    """Code-times-activation partial sums in int16 lanes (16 pairs with AVX2, 32 lanes otherwise)."""
    if ISA == "avx2":
        v16i16 = ir.VectorType(_I16, 16)
        maddubs = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw",
                                                   fnty=ir.FunctionType(v16i16, [_V32I8, _V32I8]))
        return builder.call(maddubs, [codes, x])
    v32i16 = ir.VectorType(_I16, 32)
    return builder.mul(builder.zext(codes, v32i16), builder.sext(x, v32i16))


def _widen16(builder, acc16):
    """int16 lanes -> int32 lanes (vpmaddwd with ones on AVX2)."""
    if ISA == "avx2":
        v16i16, v8i32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
        maddwd = builder.module.declare_intrinsic("llvm.x86.avx2.pmadd.wd",
                                                  fnty=ir.FunctionType(v8i32, [v16i16, v16i16]))
        return builder.call(maddwd, [acc16, ir.Constant(v16i16, [1] * 16)])
    return builder.sext(acc16, ir.VectorType(_I32, 32))


def _hsum(builder, vec, lanes):
    total = builder.extract_element(vec, ir.Constant(_I32, 0))
    for k in range(1, lanes):
        total = builder.add(total, builder.extract_element(vec, ir.Constant(_I32, k)))
    return total


def _emit_tile(context, builder, signature, args, tokens: int):
    """4 rows x `tokens` int32 sums: codes of one packed row against q[t0 + j] for j < tokens."""
    p_arr = context.make_array(signature.args[0])(context, builder, args[0])
    q_arr = context.make_array(signature.args[1])(context, builder, args[1])
    pp = builder.bitcast(p_arr.data, _I8.as_pointer())
    qp = builder.bitcast(q_arr.data, _I8.as_pointer())
    stride = builder.extract_value(q_arr.strides, 0)
    t0, n = (builder.sext(a, _I64) if a.type.width < 64 else a for a in (args[2], args[3]))
    rows = [builder.gep(qp, [builder.mul(builder.add(t0, ir.Constant(_I64, j)), stride)]) for j in range(tokens)]
    lanes16, lanes32 = (16, 8) if ISA == "avx2" else (32, 32)
    t16, t32 = ir.VectorType(_I16, lanes16), ir.VectorType(_I32, lanes32)
    n_acc = 4 * tokens

    pre = builder.block
    outer = builder.append_basic_block("chunks.loop")
    inner_pre = builder.append_basic_block("chunks.body")
    inner = builder.append_basic_block("blocks.loop")
    body = builder.append_basic_block("blocks.body")
    inner_done = builder.append_basic_block("chunks.next")
    done = builder.append_basic_block("chunks.done")
    builder.branch(outer)

    builder.position_at_end(outer)
    ob = builder.phi(_I64)
    acc32 = [builder.phi(t32) for _ in range(n_acc)]
    ob.add_incoming(ir.Constant(_I64, 0), pre)
    for a in acc32:
        a.add_incoming(ir.Constant(t32, [0] * lanes32), pre)
    builder.cbranch(builder.icmp_signed("<", ob, n), inner_pre, done)

    builder.position_at_end(inner_pre)
    end = builder.add(ob, ir.Constant(_I64, CHUNK))
    end = builder.select(builder.icmp_signed("<", end, n), end, n)
    builder.branch(inner)

    builder.position_at_end(inner)
    ib = builder.phi(_I64)
    acc16 = [builder.phi(t16) for _ in range(n_acc)]
    ib.add_incoming(ob, inner_pre)
    for a in acc16:
        a.add_incoming(ir.Constant(t16, [0] * lanes16), inner_pre)
    builder.cbranch(builder.icmp_signed("<", ib, end), body, inner_done)

    builder.position_at_end(body)
    off = builder.mul(ib, ir.Constant(_I64, BLOCK))
    packed = builder.load(builder.bitcast(builder.gep(pp, [off]), _V32I8.as_pointer()), align=1)
    codes = _unpack_codes(builder, packed)
    new16 = []
    for j in range(tokens):
        x = builder.load(builder.bitcast(builder.gep(rows[j], [off]), _V32I8.as_pointer()), align=1)
        for i in range(4):
            new16.append(builder.add(acc16[4 * j + i], _pairs16(builder, codes[i], x)))
    ib.add_incoming(builder.add(ib, ir.Constant(_I64, 1)), builder.block)
    for a, v in zip(acc16, new16):
        a.add_incoming(v, builder.block)
    builder.branch(inner)

    builder.position_at_end(inner_done)
    for a32, a16 in zip(acc32, acc16):
        a32.add_incoming(builder.add(a32, _widen16(builder, a16)), inner_done)
    ob.add_incoming(end, inner_done)
    builder.branch(outer)

    builder.position_at_end(done)
    return [_hsum(builder, a, lanes32) for a in acc32]


def _tile_intrinsic(tokens: int):
    @intrinsic
    def tile(typingctx, packed_row, q, t0, nblocks):
        sig = types.UniTuple(types.int32, 4 * tokens)(packed_row, q, t0, nblocks)

        def codegen(context, builder, signature, args):
            sums = _emit_tile(context, builder, signature, args, tokens)
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return tile


# dot4_tile1/2(packed_row, q, t0, nblocks): the four code-weighted sums of `dot4_codes` for tokens
# q[t0], q[t0 + 1], ... (token-major: sums[4 * j + i] is output row i of token t0 + j). The codes are
# unpacked once per block for all tokens, and partial sums stay in int16 lanes for CHUNK blocks.
dot4_tile1 = _tile_intrinsic(1)
dot4_tile2 = _tile_intrinsic(2)
