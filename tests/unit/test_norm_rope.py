"""RMSNorm, the fused norm + int8 quantization and the rotary embedding against their NumPy references,
bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.kernels import quantize_rows
from ternpool.kernels import norm as norm_mod
from ternpool.kernels.norm import norm_quantize, norm_quantize_ref, rms_norm, rms_norm_ref
from ternpool.kernels.rope import apply_rope, apply_rope_ref

from helpers import assert_same_with_any_thread_count, readonly

pytestmark = pytest.mark.unit

SIZES = [(1, 1), (1, 7), (3, 9), (2, 17), (1, 2560), (5, 6912), (129, 129), (33, 3001)]


def _inputs(tokens, cols, seed=0):
    rng = np.random.default_rng(seed + tokens * 7919 + cols)
    x = (rng.standard_normal((tokens, cols)) * 3).astype(np.float32)
    gate = rng.standard_normal((tokens, cols)).astype(np.float32)
    weight = rng.standard_normal(cols).astype(np.float32)
    return x, gate, weight


@pytest.mark.parametrize("tokens,cols", SIZES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("threads", ["serial", "parallel"])
def test_norm_and_norm_quantize_are_their_references_bit_for_bit(tokens, cols, gated, threads, monkeypatch):
    monkeypatch.setattr(norm_mod, "PARALLEL_ELEMENTS", 1 << 62 if threads == "serial" else 0)
    x, gate, weight = _inputs(tokens, cols)
    gate = gate if gated else None
    y, ref = rms_norm(readonly(x), weight, 1e-5, gate), rms_norm_ref(x, weight, 1e-5, gate)
    assert y.dtype == np.float32 and y.tobytes() == ref.tobytes()
    for got, want in zip(norm_quantize(readonly(x), weight, 1e-5, gate), norm_quantize_ref(x, weight, 1e-5, gate)):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_norm_quantize_is_quantize_rows_of_the_norm_and_close_to_float64():
    x, _, weight = _inputs(16, 2560)
    y = rms_norm(x, weight, 1e-5)
    for got, want in zip(norm_quantize(x, weight, 1e-5), quantize_rows(y)):
        assert np.array_equal(got, want)
    x64 = x.astype(np.float64)
    exact = weight * x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + 1e-5)
    assert np.max(np.abs(y - exact) / (np.abs(exact) + 1e-6)) < 1e-6


def test_a_row_of_zeros_and_one_thread_or_all_give_the_same_rows():
    x, gate, weight = _inputs(64, 2049)
    x[3] = 0.0
    q, qsum, scale = norm_quantize(x, weight, 1e-5, gate)
    assert not q[3].any() and qsum[3] == 0 and np.isfinite(scale).all()
    assert_same_with_any_thread_count(lambda: norm_quantize(x, weight, 1e-5, gate)[0])
    assert_same_with_any_thread_count(lambda: rms_norm(x, weight, 1e-5, gate))


def test_each_row_is_the_same_whatever_else_is_in_the_batch():
    x, gate, weight = _inputs(80, 2560)
    whole = norm_quantize(x, weight, 1e-5, gate)  # parallel path
    for t in (0, 41, 79):
        one = norm_quantize(x[t:t + 1], weight, 1e-5, gate[t:t + 1])  # serial path
        assert all(np.array_equal(a[t], b[0]) for a, b in zip(whole, one))


def test_bad_shapes_are_refused():
    x, gate, weight = _inputs(2, 8)
    with pytest.raises(ValueError, match="2-D"):
        rms_norm(x[0], weight, 1e-5)
    with pytest.raises(ValueError, match=r"norm weight must have shape \(8,\)"):
        rms_norm(x, weight[:7], 1e-5)
    with pytest.raises(ValueError, match="gate must have the shape"):
        norm_quantize(x, weight, 1e-5, gate[:1])


@pytest.mark.parametrize("tokens,heads,dims", [(1, 1, 2), (3, 5, 6), (1, 20, 128), (129, 5, 128)])
def test_rope_is_its_reference_bit_for_bit(tokens, heads, dims):
    rng = np.random.default_rng(tokens * 31 + heads)
    x = rng.standard_normal((tokens, heads, dims)).astype(np.float32)
    angles = rng.uniform(0, 300, (tokens, dims // 2))
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    got = apply_rope(readonly(x), cos, sin)
    assert got.dtype == np.float32 and got.tobytes() == apply_rope_ref(x, cos, sin).tobytes()
    with pytest.raises(ValueError, match="rotary tables"):
        apply_rope(x, cos[:, :-1], sin[:, :-1])
