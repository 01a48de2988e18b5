"""The int8 output head against its NumPy reference (exact) and against the bf16 head (close)."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.kernels import bf16_matmul, f32_to_bf16
from ternpool.kernels.head8 import head_i8, head_i8_ref, quantize_head, quantize_hidden

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("vocab,hidden,tokens", [(1, 1, 1), (17, 33, 3), (1000, 129, 2), (300, 2560, 5)])
def test_int8_head_matches_reference_exactly(vocab, hidden, tokens):
    rng = np.random.default_rng(vocab + hidden)
    w, ws = quantize_head(f32_to_bf16(rng.standard_normal((vocab, hidden)).astype(np.float32)), rows_per_chunk=7)
    assert w.dtype == np.int8 and w.min() >= -127 and ws.dtype == np.float32
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    assert np.array_equal(head_i8(w, ws, h), head_i8_ref(w, ws, h))


def test_extremes_do_not_saturate():
    w = np.full((2, 64), -127, np.int8)
    w[1] = 127
    h = np.full((1, 64), -1.0, np.float32)  # quantizes to -127
    out = head_i8(w, np.ones(2, np.float32), h)
    hq, hs = quantize_hidden(h)
    assert out[0, 0] == np.float32(64 * 127 * 127) * hs[0] and out[0, 1] == -out[0, 0]


def test_int8_head_is_close_to_the_bf16_head():
    rng = np.random.default_rng(0)
    e = f32_to_bf16((rng.standard_normal((2000, 256)) * 0.02).astype(np.float32))
    h = rng.standard_normal((4, 256)).astype(np.float32)
    exact = bf16_matmul(e, h)
    w, ws = quantize_head(e)
    approx = head_i8(w, ws, h)
    err = np.abs(approx - exact)
    assert err.max() < 0.06 * exact.std() and err.mean() < 0.01 * exact.std()
    assert np.mean(approx.argmax(1) == exact.argmax(1)) == 1.0


def test_engine_with_int8_head_stays_close_to_bf16(tiny_engine):
    from ternpool.engine.model import BitNetModel

    m8 = BitNetModel(tiny_engine.model.weights, slots=1, max_context=64, head="int8")
    m16 = BitNetModel(tiny_engine.model.weights, slots=1, max_context=64)
    ids = np.array(tiny_engine.tokenizer.encode("Once upon a time there was"))
    args = (ids, np.arange(len(ids)), np.zeros(len(ids), int))
    exact, approx = m16.forward(*args), m8.forward(*args)
    err = np.abs(approx - exact)
    assert err.max() < 0.06 * exact.std() and err.mean() < 0.01 * exact.std()
    assert m8.head_i8[0].nbytes == tiny_engine.model.weights.embed.nbytes // 2
    with pytest.raises(ValueError, match="head must be one of"):
        BitNetModel(tiny_engine.model.weights, slots=1, max_context=64, head="fp8")
