"""The int8 output head on AMX int8 tiles, for calls with many tokens (batched decode).

Same logits as `head8._head_i8`, bit for bit: the int32 dot products of the int8 head rows with the
int8 hidden rows, times (row scale * token scale). Both operands are signed, so the tiles multiply
with `tdpbssd` (signed x signed: no +128 offset, no hidden sums). The head rows are the A tiles as
they lie in memory (16 rows, 64 columns per step, the row length as stride); the hidden rows are
re-laid into B tiles once per call (`ternary_amx.vnni_tokens`). A task takes 32 head rows at a
time (two A tiles) against every pair of token tiles; rows of a group cut by the head's end, or
whose row length is not a multiple of 64, are copied into a zero-padded buffer first (the tile
loads read whole steps of 64 columns). Whole C tiles are written 16 logits of a token at a time
(`amx.emit_store_tile`, `amx.head_scaled`), cut ones element by element.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from .amx import TILE_ROWS, emit_store_tile, head_scaled
from .config import NJIT_PARALLEL, njit
from .ternary_amx import (
    _item,
    _tile_target,
    _tile_config,
    _tile_dots,
    _tile_release,
    _void,
    vnni_tokens,
)

GROUP = 2 * TILE_ROWS  # head rows per step of a task: two A tiles

_signed_dots1 = _tile_dots(1, signed=True)
_signed_dots2 = _tile_dots(2, signed=True)


@intrinsic
def _store_logits(typingctx, out, t0, v0, c, k, wscale, hscale):
    """out[t0 + n, v0 + j] = float(c[k, j, n]) * (wscale[v0 + j] * hscale[t0 + n]) for j, n in 0..15;
    tokens t0 .. t0 + 15 and rows v0 .. v0 + 15 must exist."""
    if out.dtype != types.float32:
        return None

    def emit(context, builder, signature, args):
        t0, v0, dst, stride, acc = _tile_target(context, builder, signature, args)
        ws = _item(context, builder, signature.args[5], args[5], v0)
        hs = _item(context, builder, signature.args[6], args[6], t0)
        emit_store_tile(builder, acc, dst, stride, head_scaled(builder, ws, hs))

    return _void((out, t0, v0, c, k, wscale, hscale), emit)


@njit(**NJIT_PARALLEL)
def _amx_head(w, wscale, hv, hscale, out, threads):  # pragma: no cover - compiled
    """Logits out (T, V) from head w (V, K) int8 and hv = vnni_tokens(hidden) (see the module), in one
    task per thread."""
    V, K = w.shape
    T = out.shape[0]
    tiles = hv.shape[0]
    kp = hv.shape[1] // TILE_ROWS
    groups = (V + GROUP - 1) // GROUP
    tasks = max(1, min(threads, groups))
    for task in prange(tasks):
        buf = np.zeros((GROUP, kp), dtype=np.int8)
        c = np.empty((4, TILE_ROWS, TILE_ROWS), dtype=np.int32)
        _tile_config()
        for g in range(task * groups // tasks, (task + 1) * groups // tasks):
            v0 = g * GROUP
            rows = min(GROUP, V - v0)
            direct = rows == GROUP and K == kp
            if not direct:
                buf[:] = 0
                buf[:rows, :K] = w[v0:v0 + rows]
            for tt in range(0, tiles, 2):
                nb = min(2, tiles - tt)
                if direct and nb == 2:
                    _signed_dots2(w, v0, hv, tt, c)
                elif direct:
                    _signed_dots1(w, v0, hv, tt, c)
                elif nb == 2:
                    _signed_dots2(buf, 0, hv, tt, c)
                else:
                    _signed_dots1(buf, 0, hv, tt, c)
                for a in range(2):
                    r0 = v0 + a * TILE_ROWS
                    for b in range(nb):
                        k = a * nb + b
                        t0 = (tt + b) * TILE_ROWS
                        if t0 + TILE_ROWS <= T and r0 + TILE_ROWS <= V:  # a whole tile
                            _store_logits(out, t0, r0, c, k, wscale, hscale)
                        else:
                            for j in range(max(0, min(TILE_ROWS, V - r0))):
                                for n in range(min(TILE_ROWS, T - t0)):
                                    out[t0 + n, r0 + j] = np.float32(c[k, j, n]) * (wscale[r0 + j] * hscale[t0 + n])
        _tile_release()


def amx_head(w: np.ndarray, wscale: np.ndarray, hq: np.ndarray, hscale: np.ndarray, out: np.ndarray) -> None:
    """`head8._head_i8` on AMX tiles: out (T, V) float32 logits from int8 w (V, K) and hq (T, K)."""
    _amx_head(w, wscale, vnni_tokens(hq), hscale, out, numba.get_num_threads())
