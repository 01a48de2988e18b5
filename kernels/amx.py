"""AMX int8 tiles (Sapphire Rapids and later Xeons): the permission Linux wants, the tile
configuration, and the LLVM IR emitters of the tile kernels (`ternary_amx.py`).

AMX has eight tile registers tmm0-7 of up to 16 rows x 64 bytes. `tdpbusd C, A, B` adds to C
(16 x 16 int32) the products of A (16 rows x 64 unsigned bytes) with B (16 rows x 64 signed bytes
in the "VNNI" layout: B[k // 4][4 n + k % 4] holds element (k, n) of the 64 x 16 right operand):
16 x 16 x 64 multiply-adds per instruction, against 64 for a `vpdpbusd` on zmm. Every tile here is
configured as 16 rows x 64 bytes: tmm0-3 are the C accumulators (2 x 2: two A tiles of 16 weight
rows, two B tiles of 16 tokens), tmm4-5 the A tiles, tmm6-7 the B tiles.

The instructions come from LLVM's fixed-register intrinsics (`llvm.x86.tileloadd64` and the like,
what C's `_tile_loadd(0, p, stride)` compiles to), whose tile numbers are immediates: LLVM does no
tile register allocation and the tile state stays put between calls, so a kernel configures the
tiles once per parallel task (`ldtilecfg`), calls the emitters below, and releases them at the end.
They read and write memory as calls with side effects, so LLVM keeps them in order with the plain
stores that fill the buffers they load.

Linux hands tile state to a process only once it asks: `arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`; an AMX instruction before that raises SIGILL. `request_permission()` asks (the
`amx` strategy of `isa.py` calls it when it is selected, and the kernels fall back to another
strategy with a warning when the kernel refuses).
"""

from __future__ import annotations

import ctypes
import functools

from llvmlite import ir

from .llvmir import BYTE_PTR, I8, i64, loop, splat

_SYS_ARCH_PRCTL = 158  # x86-64
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18

TILE_ROWS = 16  # rows of every tile (weight rows of A, int32 rows of C, groups of 4 k of B)
TILE_BYTES = 64  # bytes per tile row (k of A, 16 tokens x 4 k of B, 16 int32 of C)
C_TILES, A_TILES, B_TILES = (0, 1, 2, 3), (4, 5), (6, 7)  # tmm numbers


@functools.cache
def request_permission() -> str | None:
    """Ask Linux for AMX tile data for this process (once); None when granted, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: errno {ctypes.get_errno()}"
        granted = ctypes.c_uint64(0)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
            return f"arch_prctl(ARCH_GET_XCOMP_PERM) failed: errno {ctypes.get_errno()}"
    except (OSError, AttributeError) as e:  # pragma: no cover - no libc syscall (not Linux)
        return f"cannot call arch_prctl: {e}"
    if not granted.value >> _XFEATURE_XTILEDATA & 1:
        return f"the kernel did not grant tile data (permitted features {granted.value:#x})"
    return None


def _call(builder, name: str, *args):
    fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(ir.VoidType(), [a.type for a in args]))
    return builder.call(fn, list(args))


def _tmm(n: int) -> ir.Constant:
    return ir.Constant(I8, n)


def emit_tile_config(builder):
    """`ldtilecfg` of palette 1 with tmm0-7 all 16 rows x 64 bytes (from a 64-byte stack buffer)."""
    config = [0] * 64
    config[0] = 1  # palette
    for t in range(8):
        config[16 + 2 * t] = TILE_BYTES  # bytes per row, 16-bit little-endian
        config[48 + t] = TILE_ROWS
    ty = ir.ArrayType(I8, 64)
    with builder.goto_entry_block():
        buf = builder.alloca(ty)
    builder.store(ir.Constant(ty, config), buf)
    _call(builder, "llvm.x86.ldtilecfg", builder.bitcast(buf, BYTE_PTR))


def emit_tile_release(builder):
    """`tilerelease`: the tile state back to its initial (unused) state."""
    _call(builder, "llvm.x86.tilerelease")


def emit_unpack_row(builder, packed, ncols, dsts):
    """The four code rows of one 2-bit packed row (byte pointer `packed`, `ncols` (i64) bytes) into the
    byte rows `dsts[i]` (codes (packed >> 2i) & 3), 64 columns per step; the last step loads only
    the columns left (a masked load) and writes zeros past them, up to a multiple of 64."""
    from .simd import unpack_codes

    vec = ir.VectorType(I8, TILE_BYTES)
    lanes = ir.Constant(vec, list(range(TILE_BYTES)))
    mask_ty = ir.VectorType(ir.IntType(1), TILE_BYTES)
    masked_load = builder.module.declare_intrinsic(
        "llvm.masked.load.v64i8.p0", fnty=ir.FunctionType(vec, [vec.as_pointer(), ir.IntType(32), mask_ty, vec]))

    def step(c, _):
        left = builder.sub(ncols, c)
        left = builder.select(builder.icmp_signed("<", left, i64(TILE_BYTES)), left, i64(TILE_BYTES))
        mask = builder.icmp_unsigned("<", lanes, builder.trunc(_splat_of(builder, left, vec.count), vec))
        src = builder.bitcast(builder.gep(packed, [c]), vec.as_pointer())
        bytes_ = builder.call(masked_load, [src, ir.Constant(ir.IntType(32), 1), mask, splat(vec, 0)])
        for dst, codes in zip(dsts, unpack_codes(builder, bytes_)):
            builder.store(codes, builder.bitcast(builder.gep(dst, [c]), vec.as_pointer()), align=1)
        return []

    loop(builder, "unpack", i64(0), ncols, [], step, step=TILE_BYTES)


def _splat_of(builder, value, count: int):
    """A vector of `count` lanes each `value` (an i64)."""
    ty = ir.VectorType(value.type, count)
    one = builder.insert_element(ir.Constant(ty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(ty, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), count), [0] * count))


def emit_tile_dots(builder, a_rows, a_stride, b_tiles, b_step, nsteps, c, signed: bool = False):
    """C = sum over steps s < nsteps of A_i(s) . B_j(s) for the A tiles at byte pointers `a_rows`
    (rows `a_stride` (i64) bytes apart, step s at + 64 s) and the B tiles at `b_tiles` (VNNI layout,
    64-byte rows, step s at + s * b_step), up to 2 of each, `tdpbusd` (A unsigned, B signed; `tdpbssd`
    when `signed`); C tile (i, j) is stored as 16 x 16 int32 at c + 1024 * (i * len(b_tiles) + j)."""
    assert 1 <= len(a_rows) <= len(A_TILES) and 1 <= len(b_tiles) <= len(B_TILES)
    pairs = [(i, j) for i in range(len(a_rows)) for j in range(len(b_tiles))]
    for i, j in pairs:
        _call(builder, "llvm.x86.tilezero", _tmm(C_TILES[i * 2 + j]))
    dot = "llvm.x86.tdpbssd" if signed else "llvm.x86.tdpbusd"
    row = i64(TILE_BYTES)

    def step(s, _):
        a_off = builder.mul(s, i64(TILE_BYTES))
        b_off = builder.mul(s, i64(b_step))
        for n, a in zip(A_TILES, a_rows):
            _call(builder, "llvm.x86.tileloadd64", _tmm(n), builder.gep(a, [a_off]), a_stride)
        for n, b in zip(B_TILES, b_tiles):
            _call(builder, "llvm.x86.tileloadd64", _tmm(n), builder.gep(b, [b_off]), row)
        for i, j in pairs:
            _call(builder, dot, _tmm(C_TILES[i * 2 + j]), _tmm(A_TILES[i]), _tmm(B_TILES[j]))
        return []

    loop(builder, "tiles", i64(0), nsteps, [], step)
    for k, (i, j) in enumerate(pairs):
        _call(builder, "llvm.x86.tilestored64", _tmm(C_TILES[i * 2 + j]), builder.gep(c, [i64(1024 * k)]), row)



def transpose16(builder, rows):
    """The 16 x 16 transpose of 16 vectors of 16 lanes: four rounds of two-source shuffles, each
    swapping the off-diagonal blocks of size 8, 4, 2, 1."""
    rows = list(rows)
    for h in (8, 4, 2, 1):
        for i in range(16):
            if i & h:
                continue
            a, b = rows[i], rows[i + h]
            low = [l if not l & h else 16 + l - h for l in range(16)]
            high = [l + h if not l & h else 16 + l for l in range(16)]
            rows[i] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 16), low))
            rows[i + h] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), 16), high))
    return rows


def emit_store_tile(builder, acc, out, stride, finish):
    """Write the C tile stored at `acc` (16 x 16 int32: row j = output column j, lane n = token n)
    token by token: finish(n, sums) (sums: token n's 16 int32, one per column) is the vector written
    at out + n * stride (byte pointer to token 0, column 0; i64 stride)."""
    ivec = ir.VectorType(ir.IntType(32), TILE_ROWS)
    cols = [_load(builder, builder.gep(acc, [i64(64 * j)]), ivec) for j in range(TILE_ROWS)]
    for n, sums in enumerate(transpose16(builder, cols)):
        value = finish(n, sums)
        dst = builder.gep(out, [builder.mul(stride, i64(n))])
        builder.store(value, builder.bitcast(dst, value.type.as_pointer()), align=4)


def dequantized(builder, qsum, div, mul, dequantize: bool):
    """`emit_store_tile`'s finish for `epilogue.store`: sums - qsum[n] (int32), or float(sums - qsum[n])
    / div[n] * mul (`dequantize`; float32 `mul`), from byte pointers to the tile's first token's int32
    qsum and float32 div. Vector IEEE operations, lane by lane store's scalar ones: the same bits."""
    def finish(n, sums):
        value = builder.sub(sums, _splat_of(builder, _item(builder, qsum, n, ir.IntType(32)), TILE_ROWS))
        if not dequantize:
            return value
        d = _splat_of(builder, _item(builder, div, n, ir.FloatType()), TILE_ROWS)
        value = builder.fdiv(builder.sitofp(value, ir.VectorType(ir.FloatType(), TILE_ROWS)), d)
        return builder.fmul(value, _splat_of(builder, mul, TILE_ROWS))

    return finish


def head_scaled(builder, wscale, hscale):
    """`emit_store_tile`'s finish for the int8 head: float(sums) * (wscale[j] * hscale[n]), from byte
    pointers to the tile's first row's float32 wscale and first token's hscale (head8's order)."""
    fvec = ir.VectorType(ir.FloatType(), TILE_ROWS)
    rows = _load(builder, wscale, fvec)

    def finish(n, sums):
        scale = builder.fmul(rows, _splat_of(builder, _item(builder, hscale, n, ir.FloatType()), TILE_ROWS))
        return builder.fmul(builder.sitofp(sums, fvec), scale)

    return finish


def _item(builder, base, n: int, ty):
    """The n-th item of type ty (4 bytes) after byte pointer base."""
    return builder.load(builder.bitcast(builder.gep(base, [i64(4 * n)]), ty.as_pointer()), align=4)


def _load(builder, ptr, ty):
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=4)
