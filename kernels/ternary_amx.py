"""The 2-bit ternary product on AMX int8 tiles, for calls with many tokens (prefill, batched decode).

Same result as `ternary._ternary_kernel` (code-weighted sums, minus the activation row sum, through
`epilogue.store`), bit for bit, computed as tile products (`amx.py`):

- activations are re-laid once per call (`vnni_tokens`) into B tiles: tokens in tiles of 16,
  columns in steps of 64, each step 16 rows of (16 tokens x 4 columns), zero-padded to whole tiles
  (zero activations add nothing, whatever the codes they meet);
- weights stay 2-bit packed; a task unpacks 16 packed rows at a time into a byte buffer of codes
  over all columns, one A tile per 2-bit field: row j of A tile i is output row i * R + r0 + j
  (consecutive outputs). For each pair of A tiles and each pair of token tiles, per step of 64
  columns: two A and two B tile loads and four `tdpbusd` into the 2 x 2 C tiles, stored once at the
  end. A whole C tile is transposed and written 16 outputs of a token at a time
  (`amx.emit_store_tile`, `store`'s arithmetic in vector form); tiles cut by the last token or the
  last packed row go through `store` element by element. Packed rows past R unpack as zeros.

The parallel tasks are one per thread, each configuring the tiles (`ldtilecfg`), holding its own
code buffer, and releasing the tiles at its end. Measured here (Xeon with AMX, one thread, 2b4t
shapes), against the AVX-512 VNNI kernel: about even at 8 tokens, 1.8-2.7x at 16, 4-7x at 128.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from .amx import (
    TILE_BYTES,
    TILE_ROWS,
    dequantized,
    emit_store_tile,
    emit_tile_config,
    emit_tile_dots,
    emit_tile_release,
    emit_unpack_row,
)
from .config import NJIT_PARALLEL, njit
from .epilogue import store
from .llvmir import array_data, as_i64, i64

GROUP = 16  # packed rows unpacked together: 64 output rows, four A tiles (one per 2-bit field)


def vnni_tokens(q: np.ndarray) -> np.ndarray:
    """int8 (T, K) -> int8 (ceil(T / 16), 16 * Kp) with Kp = K rounded up to 64: for each tile of 16
    tokens, row k // 4 holds [q[t, k - k % 4 + j] for t in the tile for j in 0..3] (B tiles of
    `tdpbusd`, one every 1024 bytes along a tile's row), zeros past T and K."""
    T, K = q.shape
    tiles, kp = -(-T // TILE_ROWS), -(-K // TILE_BYTES) * TILE_BYTES
    padded = np.zeros((tiles * TILE_ROWS, kp), dtype=np.int8)
    padded[:T, :K] = q
    words = padded.view(np.int32).reshape(tiles, TILE_ROWS, kp // 4)  # 4 columns per int32
    return np.ascontiguousarray(words.transpose(0, 2, 1)).view(np.int8).reshape(tiles, TILE_ROWS * kp)


def _void(argtypes, emit):
    def codegen(context, builder, signature, args):
        emit(context, builder, signature, args)
        return context.get_dummy_value()

    return types.void(*argtypes), codegen


@intrinsic
def _tile_config(typingctx):
    return _void((), lambda context, builder, signature, args: emit_tile_config(builder))


@intrinsic
def _tile_release(typingctx):
    return _void((), lambda context, builder, signature, args: emit_tile_release(builder))


def _row(context, builder, arrty, arr, r):
    """Byte pointer to row r of a 2-D array argument, and its row stride in bytes (i64)."""
    a = context.make_array(arrty)(context, builder, arr)
    stride = builder.extract_value(a.strides, 0)
    return builder.gep(array_data(context, builder, arrty, arr), [builder.mul(as_i64(builder, r), stride)]), stride


def _item(context, builder, arrty, arr, i):
    """Pointer to item i (i64) of a 1-D array argument of 4-byte items."""
    return builder.gep(array_data(context, builder, arrty, arr), [builder.mul(i, i64(4))])


def _tile_target(context, builder, signature, args):
    """For a store intrinsic (out, t0, col, c, k, ...): t0 and col (i64), a pointer to out[t0, col] with
    out's row stride in bytes, and a pointer to the k-th 16 x 16 int32 tile of c."""
    t0, col = as_i64(builder, args[1]), as_i64(builder, args[2])
    row, stride = _row(context, builder, signature.args[0], args[0], t0)
    acc = builder.gep(array_data(context, builder, signature.args[3], args[3]),
                      [builder.mul(as_i64(builder, args[4]), i64(4 * TILE_ROWS * TILE_ROWS))])
    return t0, col, builder.gep(row, [builder.mul(col, i64(4))]), stride, acc


@intrinsic
def _unpack_row(typingctx, packed, r, codes, j):
    """codes[j + 16 i, :] = (packed[r, :] >> 2i) & 3 for i in 0..3, zeros up to codes' width."""
    def emit(context, builder, signature, args):
        src, _ = _row(context, builder, signature.args[0], args[0], args[1])
        ncols = builder.extract_value(context.make_array(signature.args[0])(context, builder, args[0]).shape, 1)
        j = as_i64(builder, args[3])
        dsts = [_row(context, builder, signature.args[2], args[2], builder.add(j, i64(TILE_ROWS * i)))[0]
                for i in range(4)]
        emit_unpack_row(builder, src, ncols, dsts)

    return _void((packed, r, codes, j), emit)


def _tile_dots(b_tiles: int, signed: bool = False):
    """A Numba intrinsic (a, row0, qv, tt, c): the C tiles of the A tiles at rows row0 .. row0 + 15 and
    row0 + 16 .. row0 + 31 of the byte matrix a against token tiles tt .. tt + b_tiles - 1 of qv
    (`vnni_tokens`), over qv's columns (a's row must be as long), stored into c (int32, 16 x 16 per C
    tile: A tile i, token tile j at i * b_tiles + j); `tdpbusd` (a unsigned), or `tdpbssd` (signed)."""
    @intrinsic
    def dots(typingctx, a, row0, qv, tt, c):
        def emit(context, builder, signature, args):
            first = as_i64(builder, args[1])
            a0, a_stride = _row(context, builder, signature.args[0], args[0], first)
            a1, _ = _row(context, builder, signature.args[0], args[0], builder.add(first, i64(TILE_ROWS)))
            tt = as_i64(builder, args[3])
            bs = [_row(context, builder, signature.args[2], args[2], builder.add(tt, i64(j)))[0] for j in range(b_tiles)]
            b_stride = _row(context, builder, signature.args[2], args[2], i64(0))[1]
            steps = builder.sdiv(b_stride, i64(TILE_ROWS * TILE_BYTES))
            emit_tile_dots(builder, [a0, a1], a_stride, bs, TILE_ROWS * TILE_BYTES, steps,
                           array_data(context, builder, signature.args[4], args[4]), signed)

        return _void((a, row0, qv, tt, c), emit)

    return dots


_tile_dots1 = _tile_dots(1)
_tile_dots2 = _tile_dots(2)


@intrinsic
def _store_tile(typingctx, out, t0, col, c, k, qsum, div, mul):
    """`store(out, t0 + n, col + j, c[k, j, n], qsum[t0 + n], div[t0 + n], mul)` for j, n in 0..15,
    vectorized (`amx.emit_store_tile`, `amx.dequantized`); tokens t0 .. t0 + 15 and columns col .. col + 15 must exist."""
    if out.dtype not in (types.int32, types.float32):
        return None

    def emit(context, builder, signature, args):
        t0, col, dst, stride, acc = _tile_target(context, builder, signature, args)
        qsum = _item(context, builder, signature.args[5], args[5], t0)
        div = _item(context, builder, signature.args[6], args[6], t0)
        emit_store_tile(builder, acc, dst, stride, dequantized(builder, qsum, div, args[7], out.dtype == types.float32))

    return _void((out, t0, col, c, k, qsum, div, mul), emit)


@njit(**NJIT_PARALLEL)
def _amx_kernel(packed, qv, qsum, div, mul, out, threads):  # pragma: no cover - compiled
    """out (T, 4R) from packed (R, K) and qv = vnni_tokens(q), through `store` (see the module), in
    one task per thread."""
    R = packed.shape[0]
    T = out.shape[0]
    tiles = qv.shape[0]
    kp = qv.shape[1] // TILE_ROWS
    groups = (R + GROUP - 1) // GROUP
    tasks = max(1, min(threads, groups))
    for task in prange(tasks):
        codes = np.zeros((4 * GROUP, kp), dtype=np.uint8)
        c = np.empty((4, TILE_ROWS, TILE_ROWS), dtype=np.int32)
        _tile_config()
        for g in range(task * groups // tasks, (task + 1) * groups // tasks):
            r0 = g * GROUP
            for j in range(GROUP):
                if r0 + j < R:
                    _unpack_row(packed, r0 + j, codes, j)
                else:
                    for i in range(4):
                        codes[j + GROUP * i, :] = 0
            for i0 in range(0, 4, 2):
                for tt in range(0, tiles, 2):
                    nb = min(2, tiles - tt)
                    if nb == 2:
                        _tile_dots2(codes, i0 * TILE_ROWS, qv, tt, c)
                    else:
                        _tile_dots1(codes, i0 * TILE_ROWS, qv, tt, c)
                    for a in range(2):
                        col = (i0 + a) * R + r0
                        for b in range(nb):
                            k = a * nb + b
                            t0 = (tt + b) * TILE_ROWS
                            if t0 + TILE_ROWS <= T and r0 + GROUP <= R:  # a whole tile
                                _store_tile(out, t0, col, c, k, qsum, div, mul)
                            else:
                                for j in range(min(GROUP, R - r0)):
                                    for n in range(min(TILE_ROWS, T - t0)):
                                        store(out, t0 + n, col + j, c[k, j, n], qsum[t0 + n], div[t0 + n], mul)
        _tile_release()


def amx_ternary(packed, q, qsum, div, mul, out) -> None:
    """`ternary._ternary_kernel` on AMX tiles: out (T, 4R), int32 or dequantized float32."""
    amx_ternaries([packed], q, qsum, [div], [mul], [out])


def amx_ternaries(packs, q, qsum, divs, muls, outs) -> None:
    """`amx_ternary` for several linears on the same activations, re-laid into tiles once."""
    tiles, threads = vnni_tokens(q), numba.get_num_threads()
    for packed, div, mul, out in zip(packs, divs, muls, outs):
        _amx_kernel(packed, tiles, qsum, div, mul, out, threads)
