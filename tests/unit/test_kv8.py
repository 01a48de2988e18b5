"""The int8 KV cache's rows (kernels/kv8.py): the quantization's values, its scale's bytes, and the compiled row
reader against the NumPy dequantization, exact, odd sizes included."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.kernels.kv8 import SCALE_BYTES, dequantize_kv, dequantize_row, quantize_kv, row_width

from helpers import readonly

pytestmark = pytest.mark.unit


def _quantize_one(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """One row the plain way: values and scale."""
    d = np.float32(max(abs(float(v)) for v in x)) / np.float32(127.0)
    q = [0 if d == 0 else int(np.clip(np.rint(np.float32(v) / d), -127, 127)) for v in x]
    return np.array(q, dtype=np.int8), np.float32(d)


@pytest.mark.parametrize("dim", [1, 3, 127, 129])
def test_rows_are_values_then_the_little_endian_scale(dim):
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((3, 2, dim)) * rng.uniform(0.01, 100, (3, 2, 1))).astype(np.float32)
    x[1, 1] = 0.0
    rows = quantize_kv(x)
    assert rows.dtype == np.int8 and rows.shape == (3, 2, row_width(dim)) == (3, 2, dim + SCALE_BYTES)
    for idx in np.ndindex(3, 2):
        q, d = _quantize_one(x[idx])
        assert np.array_equal(rows[idx][:dim], q), idx
        assert rows[idx][dim:].tobytes() == d.astype("<f4").tobytes(), idx
        if d:  # the largest magnitude is +-127 and every value is within half a step
            assert np.abs(rows[idx][:dim].astype(np.int32)).max() == 127
            assert np.all(np.abs(dequantize_kv(rows[idx]) - x[idx]) <= d / 2 * (1 + 1e-6))
    assert not rows[1, 1].any() and not dequantize_kv(rows[1, 1]).any()  # all zero, scale 0


def test_rounding_is_half_to_even():
    x = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5], dtype=np.float32)  # scale exactly 1
    rows = quantize_kv(x)
    assert rows[:-SCALE_BYTES].tolist() == [127, 0, 2, 2, 0, -2, -126]
    assert np.array_equal(dequantize_kv(rows), [127, 0, 2, 2, 0, -2, -126])


@pytest.mark.parametrize("dim", [1, 3, 127, 129])
def test_the_compiled_row_reader_is_the_reference(dim):
    rng = np.random.default_rng(dim + 7)
    x = (rng.standard_normal((2, 3, 5, dim)) * rng.uniform(1e-30, 1e6, (2, 3, 5, 1))).astype(np.float32)
    x[0, 1, 4] = 0.0
    cache = readonly(quantize_kv(x))  # (S, KVH, C, D + 4), read-only as a mapped cache would be
    ref = dequantize_kv(cache)
    bits = np.empty(dim, dtype=np.uint32)
    for s, kvh, j in np.ndindex(2, 3, 5):
        got = dequantize_row(cache, s, kvh, j, bits, bits.view(np.float32))
        assert np.array_equal(got, ref[s, kvh, j]), (s, kvh, j)
