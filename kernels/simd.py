"""SIMD dot products of 2-bit packed ternary codes with int8 activations, written in LLVM IR.

LLVM does not find `vpmaddubsw` in a Numba loop (it widens to int32 lanes
and does ~25 G multiply-adds/s here); this intrinsic emits it directly.
`dot4_codes(packed_row, x_row, nblocks)` returns the four int32 sums

    sum_c ((packed_row[c] >> 2i) & 3) * x_row[c]    for i = 0..3, c < 32 * nblocks

i.e. the code-weighted sums of the four output rows that one packed row
holds. With ISA "avx2" each block of 32 columns is one 32-byte load of
codes and of activations, four shift/and, four `vpmaddubsw` (u8 x s8 ->
pairs in i16; |2*128 + 2*128| fits) and four `vpmaddwd` into int32 lanes.
With ISA "generic" the same sums are built from plain vector IR that any
x86-64 CPU (and LLVM target) can run.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .config import ISA

BLOCK = 32
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8 = ir.VectorType(_I8, 32)


def _avx2_block(builder, codes, x, accs):
    v16i16, v8i32 = ir.VectorType(_I16, 16), ir.VectorType(_I32, 8)
    mod = builder.module
    maddubs = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw", fnty=ir.FunctionType(v16i16, [_V32I8, _V32I8]))
    maddwd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd", fnty=ir.FunctionType(v8i32, [v16i16, v16i16]))
    ones = ir.Constant(v16i16, [1] * 16)
    return [builder.add(a, builder.call(maddwd, [builder.call(maddubs, [c, x]), ones])) for a, c in zip(accs, codes)]


def _generic_block(builder, codes, x, accs):
    v32i16, v32i32 = ir.VectorType(_I16, 32), ir.VectorType(_I32, 32)
    xs = builder.sext(x, v32i16)
    return [builder.add(a, builder.sext(builder.mul(builder.zext(c, v32i16), xs), v32i32)) for a, c in zip(accs, codes)]


def emit_block_loop(context, builder, signature, args, n_accs: int, lanes: int, step):
    """Emit `for i in range(nblocks)` over two int8 rows, 32 bytes at a time, with `n_accs` vector
    accumulators of `lanes` int32; `step(builder, a_block, b_block, accs) -> new accs`.
    Returns the horizontal sums of the accumulators (int32 values)."""
    a_arr = context.make_array(signature.args[0])(context, builder, args[0])
    b_arr = context.make_array(signature.args[1])(context, builder, args[1])
    ap = builder.bitcast(a_arr.data, _I8.as_pointer())
    bp = builder.bitcast(b_arr.data, _I8.as_pointer())
    n = args[2]
    n = builder.sext(n, _I64) if n.type.width < 64 else n
    acc_t = ir.VectorType(_I32, lanes)

    pre = builder.block
    loop = builder.append_basic_block("blocks.loop")
    body = builder.append_basic_block("blocks.body")
    done = builder.append_basic_block("blocks.done")
    builder.branch(loop)

    builder.position_at_end(loop)
    idx = builder.phi(_I64)
    accs = [builder.phi(acc_t) for _ in range(n_accs)]
    idx.add_incoming(ir.Constant(_I64, 0), pre)
    for acc in accs:
        acc.add_incoming(ir.Constant(acc_t, [0] * lanes), pre)
    builder.cbranch(builder.icmp_signed("<", idx, n), body, done)

    builder.position_at_end(body)
    off = builder.mul(idx, ir.Constant(_I64, BLOCK))
    a = builder.load(builder.bitcast(builder.gep(ap, [off]), _V32I8.as_pointer()), align=1)
    b = builder.load(builder.bitcast(builder.gep(bp, [off]), _V32I8.as_pointer()), align=1)
    new = step(builder, a, b, accs)
    idx.add_incoming(builder.add(idx, ir.Constant(_I64, 1)), builder.block)
    for acc, v in zip(accs, new):
        acc.add_incoming(v, builder.block)
    builder.branch(loop)

    builder.position_at_end(done)
    sums = []
    for acc in accs:
        total = builder.extract_element(acc, ir.Constant(_I32, 0))
        for k in range(1, lanes):
            total = builder.add(total, builder.extract_element(acc, ir.Constant(_I32, k)))
        sums.append(total)
    return sums


def _codes_step(builder, packed, x, accs):
    mask = ir.Constant(_V32I8, [3] * 32)
    codes = [builder.and_(packed, mask)]
    codes += [builder.and_(builder.lshr(packed, ir.Constant(_V32I8, [2 * i] * 32)), mask) for i in (1, 2)]
    codes.append(builder.lshr(packed, ir.Constant(_V32I8, [6] * 32)))
    block = _avx2_block if ISA == "avx2" else _generic_block
    return block(builder, codes, x, accs)


@intrinsic
def dot4_codes(typingctx, packed_row, x_row, nblocks):
    sig = types.UniTuple(types.int32, 4)(packed_row, x_row, nblocks)

    def codegen(context, builder, signature, args):
        lanes = 8 if ISA == "avx2" else 32
        sums = emit_block_loop(context, builder, signature, args, 4, lanes, _codes_step)
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen
