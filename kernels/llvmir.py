"""The LLVM IR toolkit of the SIMD kernels: types, loads, loops with carried values, horizontal sums,
x86 intrinsic calls, and the glue that turns an emitter into a Numba `@intrinsic`.

Emitters (`simd.py`, `simd_base3.py`) are written against plain llvmlite values (byte pointers,
i64 counts) and an instruction-set strategy (`isa.py`), so that the same emitter serves Numba
(through `int32_sums`) and a bare llvmlite module compiled for a named CPU (the assembly tests).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V32I8 = ir.VectorType(I8, 32)  # one 32-byte load (a block of the base-3 layout)
V16I16 = ir.VectorType(I16, 16)
V32I16 = ir.VectorType(I16, 32)
BYTE_PTR = I8.as_pointer()


def splat(ty: ir.VectorType, value: int) -> ir.Constant:
    """The vector constant with every lane `value`."""
    return ir.Constant(ty, [value] * ty.count)


def i64(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def as_i64(builder, v):
    """A narrower integer sign-extended to i64 (Numba passes intp or smaller ints)."""
    return builder.sext(v, I64) if v.type.width < 64 else v


def load(builder, base, off, ty: ir.VectorType = V32I8):
    """The vector of type `ty` (32 bytes unless told) at base + off (an i8 pointer and an i64 byte
    offset), unaligned."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=1)


def load32(builder, base, off):
    """The 32 bytes at base + off."""
    return load(builder, base, off, V32I8)


def concat(builder, parts):
    """One vector of the lanes of `parts` (vectors of one type) in order: a single part as it is."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))
                 for a, b in zip(parts[::2], parts[1::2])]
    return parts[0]


def hsum(builder, vec):
    """The sum of a vector's lanes (a scalar of its element type)."""
    total = builder.extract_element(vec, ir.Constant(I32, 0))
    for k in range(1, vec.type.count):
        total = builder.add(total, builder.extract_element(vec, ir.Constant(I32, k)))
    return total


# bytes ahead of the packed weights being read that the kernels ask the cache for: a batch-1 call
# streams its weights from memory with little arithmetic per byte, and the hardware prefetchers alone
# left it at 6.9 GB/s per thread where a plain read gets 15 (2-bit 6912 x 2560 over 40 copies of it,
# Sapphire Rapids, 1 thread: 6.9 GB/s without, 10.5 at 512 bytes, 11.2 at 1024, 11.4-12.1 from 2048
# to 16384; 2 threads 13.2 -> 19-22)
PREFETCH_AHEAD = 4096


def prefetch(builder, base, off):
    """Ask for the cache line PREFETCH_AHEAD bytes past base + off (an i8 pointer, an i64) for
    reading, into every level (prefetcht0); a prefetch never faults, so it may point past the array."""
    address = builder.gep(base, [builder.add(off, i64(PREFETCH_AHEAD))])
    call_intrinsic(builder, "llvm.prefetch.p0", ir.VoidType(), [address, ir.Constant(I32, 0), ir.Constant(I32, 3),
                                                                ir.Constant(I32, 1)])  # read, keep, data


def call_intrinsic(builder, name: str, ret, args):
    """Declare the LLVM intrinsic `name` (e.g. llvm.x86.avx2.pmadd.ub.sw) in the module and call it."""
    fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(ret, [a.type for a in args]))
    return builder.call(fn, list(args))


def loop(builder, name: str, start, stop, carried, body, step: int | None = 1):
    """Emit `for i in range(start, stop, step)` (i64, step > 0) with loop-carried values.

    `body(i, values) -> new values` emits one trip; `carried` are the values on entry. With
    step=None, `body(i, values) -> (next i, new values)` moves i itself (forward). Returns the
    values after the loop (the phis of its header, from which it exits); the builder is left in
    the block after the loop."""
    pre = builder.block
    head = builder.append_basic_block(f"{name}.loop")
    trip = builder.append_basic_block(f"{name}.body")
    done = builder.append_basic_block(f"{name}.done")
    builder.branch(head)

    builder.position_at_end(head)
    i = builder.phi(I64)
    phis = [builder.phi(v.type) for v in carried]
    i.add_incoming(start, pre)
    for phi, v in zip(phis, carried):
        phi.add_incoming(v, pre)
    builder.cbranch(builder.icmp_signed("<", i, stop), trip, done)

    builder.position_at_end(trip)
    if step is None:
        following, new = body(i, list(phis))
    else:
        new = body(i, list(phis))
        following = builder.add(i, i64(step))
    assert len(new) == len(phis), (len(new), len(phis))
    i.add_incoming(following, builder.block)
    for phi, v in zip(phis, new):
        phi.add_incoming(v, builder.block)
    builder.branch(head)

    builder.position_at_end(done)
    return phis


def block_sums(builder, name: str, isa, n, naccs: int, block, chunk: int | None = None):
    """`naccs` int32 accumulators (isa.acc_type) summed over blocks 0 .. n - 1 (i64), where
    `block(idx, accs) -> accs` adds block idx.

    With short lanes (`isa.short_pairs`) and a `chunk`, `block` adds into short accumulators
    (isa.pair_type, from zero) for `chunk` blocks, which are then widened into the int32 ones;
    `chunk` must keep the short sums from overflowing (the caller's bound). Without a chunk `block`
    adds into the int32 accumulators itself. Without short lanes (VNNI: madd adds into int32 lanes)
    there are no chunks, but madd's latency (`vpdpbusd`: 4-5 cycles, 1-2 per cycle) would bind a
    loop with few accumulators: block idx goes into the (idx % copies)-th of `copies` independent
    sets of accumulators, enough for isa.chains chains in all, summed at the end."""
    zero_acc, zero_pairs = splat(isa.acc_type, 0), splat(isa.pair_type, 0)
    if not isa.short_pairs:
        return interleaved_sums(builder, name, n, [zero_acc] * naccs, block, min(4, -(-isa.chains // naccs)))
    if chunk is None:
        return loop(builder, f"{name}.blocks", i64(0), n, [zero_acc] * naccs, block)

    def one_chunk(start, accs):
        end = builder.add(start, i64(chunk))
        end = builder.select(builder.icmp_signed("<", end, n), end, n)
        pairs = loop(builder, f"{name}.blocks", start, end, [zero_pairs] * naccs, block)
        return end, [builder.add(a, isa.widen(builder, p)) for a, p in zip(accs, pairs)]

    return loop(builder, f"{name}.chunks", i64(0), n, [zero_acc] * naccs, one_chunk, step=None)


def interleaved_sums(builder, name: str, n, zeros, block, copies: int):
    """`block(idx, accs) -> accs` over idx = 0 .. n - 1 into `copies` sets of accumulators (starting
    at `zeros`): `copies` blocks per trip, one into each set, the blocks past the last whole trip
    into set 0; returns the sums of the sets."""
    if copies == 1:
        return loop(builder, f"{name}.blocks", i64(0), n, zeros, block)
    k = len(zeros)

    def trip(i, accs):
        return [a for c in range(copies) for a in block(builder.add(i, i64(c)) if c else i, accs[c * k:(c + 1) * k])]

    whole = builder.mul(builder.sdiv(n, i64(copies)), i64(copies))
    sets = loop(builder, f"{name}.x{copies}", i64(0), whole, zeros * copies, trip, step=copies)
    total = loop(builder, f"{name}.rest", whole, n, sets[:k], block)
    for c in range(1, copies):
        total = [builder.add(a, b) for a, b in zip(total, sets[c * k:(c + 1) * k])]
    return total


# --- Numba glue ---------------------------------------------------------------------------------

def array_data(context, builder, arrty, arr):
    """The data pointer of a Numba array argument, as an i8 pointer."""
    return builder.bitcast(context.make_array(arrty)(context, builder, arr).data, BYTE_PTR)


def matrix_rows(context, builder, arrty, arr, t0, count: int):
    """i8 pointers to rows t0, t0 + 1, ..., t0 + count - 1 of a Numba 2-D array argument."""
    a = context.make_array(arrty)(context, builder, arr)
    base = builder.bitcast(a.data, BYTE_PTR)
    stride = builder.extract_value(a.strides, 0)
    t0 = as_i64(builder, t0)
    return [builder.gep(base, [builder.mul(builder.add(t0, i64(j)), stride)]) for j in range(count)]


def array_items(context, builder, arrty, arr, i0, count: int):
    """Items i0, i0 + 1, ..., i0 + count - 1 of a Numba 1-D C-contiguous array argument."""
    data = context.make_array(arrty)(context, builder, arr).data
    i0 = as_i64(builder, i0)
    return [builder.load(builder.gep(data, [builder.add(i0, i64(j))])) for j in range(count)]


def int32_sums(argtypes, n: int, emit):
    """(signature, codegen) for a Numba `@intrinsic` over `argtypes` whose
    `emit(context, builder, signature, args)` returns n int32 values: the intrinsic returns an int32
    when n == 1, else a UniTuple of n int32."""
    ret = types.int32 if n == 1 else types.UniTuple(types.int32, n)

    def codegen(context, builder, signature, args):
        sums = emit(context, builder, signature, args)
        return sums[0] if n == 1 else context.make_tuple(builder, signature.return_type, sums)

    return ret(*argtypes), codegen
