"""The AMX tile paths of the 2-bit ternary product and the int8 head (`kernels/amx.py`,
`kernels/ternary_amx.py`, `kernels/head8_amx.py`): exact against the NumPy references on odd sizes,
the float results bit for bit the AVX-512 VNNI kernels', batched rows the same as unbatched; run in a process with TERNPOOL_ISA=amx where the CPU
has AMX int8, skipped naming the missing features elsewhere. The token re-layout and the fallback
when Linux refuses tile data are checked on every machine."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers import assert_exact_under_isa

pytestmark = pytest.mark.unit

_AMX_CHECK = """
import numpy as np
from ternpool.kernels import (config, dequant_factors, pack_ternary, quantize_rows, set_threads, ternary_linear,
                              ternary_linear_ref, ternary_matmul, ternary_matmul_ref)
from ternpool.kernels.epilogue import unused_factors
from ternpool.kernels.ternary import TILE_TOKENS, _ternary_kernel
from ternpool.kernels.ternary_amx import amx_ternary

assert config.ISA == "amx" and TILE_TOKENS > 1, (config.ISA, TILE_TOKENS)
rng = np.random.default_rng(14)
# R = rows / 4 of 1, 3, 13 (not whole groups of 8 packed rows), 129; K short of, at, and past 64
for rows, cols in [(4, 1), (12, 33), (52, 64), (516, 129), (36, 200), (32, 2560)]:
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    packed.setflags(write=False)  # as weights from the Ray object store or an mmap
    for tokens in [1, 2, 15, 16, 17, 33, 64, 100, 130]:
        q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
        q[0] = -128
        q[-1] = 127
        qsum = q.astype(np.int32).sum(axis=1).astype(np.int32)
        want = ternary_matmul_ref(packed, q)
        for threads in (1, None):
            set_threads(threads)
            out = np.empty((tokens, rows), np.int32)
            amx_ternary(packed, q, qsum, *unused_factors(tokens), out)
            assert np.array_equal(out, want), (rows, cols, tokens, threads)
        assert np.array_equal(ternary_matmul(packed, q), want), (rows, cols, tokens)

        x = rng.standard_normal((tokens, cols)).astype(np.float32)
        q8, qs, scale = quantize_rows(x)
        div, mul = dequant_factors(scale, 0.7, False)
        tiles = np.empty((tokens, rows), np.float32)
        amx_ternary(packed, q8, qs, div, mul, tiles)
        vnni = np.empty_like(tiles)
        _ternary_kernel((packed,), q8, qs, div[None], np.array([mul], np.float32), (vnni,))
        assert np.array_equal(tiles, vnni), (rows, cols, tokens)
        assert np.array_equal(tiles, ternary_linear_ref(packed, q8, div, mul)), (rows, cols, tokens)
        batched = ternary_linear(packed, q8, qs, div, mul)  # tiles from TILE_TOKENS tokens on
        for t in {0, tokens // 2, tokens - 1}:
            one = ternary_linear(packed, q8[t:t + 1], qs[t:t + 1], div[t:t + 1], mul)
            assert np.array_equal(one[0], batched[t]), (rows, cols, tokens, t)

from ternpool.kernels.head8 import TILE_TOKENS as HEAD_TILE_TOKENS, _head_i8, head_i8, head_i8_ref, quantize_hidden
from ternpool.kernels.head8_amx import amx_head

assert HEAD_TILE_TOKENS > 1, HEAD_TILE_TOKENS
# V: short of, at, and past whole groups of 32 rows; K: short of and at multiples of 64 (copied rows
# and rows loaded as they lie)
for vocab, hidden in [(5, 64), (70, 97), (64, 128), (33, 333), (200, 2560)]:
    w = rng.integers(-127, 128, size=(vocab, hidden)).astype(np.int8)
    w[0], w[-1] = -127, 127
    w.setflags(write=False)
    ws = rng.uniform(0.5, 2, vocab).astype(np.float32)
    for tokens in [1, 3, 4, 16, 17, 40, 130]:
        h = rng.standard_normal((tokens, hidden)).astype(np.float32)
        h[0] = -1.0  # quantizes to -127 everywhere
        hq, hscale = quantize_hidden(h)
        want = head_i8_ref(w, ws, h)
        for threads in (1, None):
            set_threads(threads)
            tiles = np.empty((tokens, vocab), np.float32)
            amx_head(w, ws, hq, hscale, tiles)
            assert np.array_equal(tiles, want), (vocab, hidden, tokens, threads)
        vnni = np.empty_like(tiles)
        _head_i8(w, ws, hq, hq[:, :hidden // 64 * 64].sum(axis=1, dtype=np.int32), hscale, vnni)
        assert np.array_equal(tiles, vnni), (vocab, hidden, tokens)
        batched = head_i8(w, ws, h)  # tiles from HEAD_TILE_TOKENS tokens on
        assert np.array_equal(batched, want), (vocab, hidden, tokens)
        for t in {0, tokens - 1}:
            assert np.array_equal(head_i8(w, ws, h[t:t + 1])[0], batched[t]), (vocab, hidden, tokens, t)
print("exact with", config.ISA)
"""


def test_amx_tiles_are_exact(tmp_path):  # the 2-bit product and the int8 head
    assert_exact_under_isa("amx", _AMX_CHECK, tmp_path)


@pytest.mark.parametrize("tokens,cols", [(1, 1), (5, 63), (16, 64), (17, 130), (40, 256)])
def test_vnni_tokens_layout(tokens, cols):
    """Token tile j, step s, row k4, bytes 4n + i: q[16 j + n, 64 s + 4 k4 + i], zeros past the ends."""
    from ternpool.kernels.ternary_amx import vnni_tokens

    q = np.random.default_rng(tokens + cols).integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    qv = vnni_tokens(q)
    tiles, kp = -(-tokens // 16), -(-cols // 64) * 64
    assert qv.shape == (tiles, 16 * kp) and qv.dtype == np.int8
    b = qv.reshape(tiles, kp // 4, 16, 4)  # (tile, column group k // 4, token n, k % 4)
    want = np.zeros((tiles * 16, kp), np.int8)
    want[:tokens, :cols] = q
    for j in range(tiles):
        for k in range(kp):
            assert np.array_equal(b[j, k // 4, :, k % 4], want[16 * j:16 * j + 16, k])


def test_a_refused_instruction_set_falls_back_with_a_warning(monkeypatch, caplog):
    """When Linux will not grant tile data, the kernels take the best other instruction set and say why."""
    from ternpool.kernels import config
    from ternpool.kernels.isa import ISAS, usable_isas

    monkeypatch.setattr(type(ISAS["amx"]), "enable", lambda self: "refused for the test")
    with caplog.at_level(logging.WARNING, logger=config.log.name):
        fallback = config._enabled("amx")
    assert fallback == next((n for n in usable_isas() if n != "amx"), "generic")
    assert "amx kernels cannot run" in caplog.text and "refused for the test" in caplog.text
    assert config._enabled("generic") == "generic"
