"""The lookup-table kernel (kernels/lut.py) against its NumPy reference and the dot-product kernel:
exact int32, bit-identical float32 epilogue, odd sizes (K not a multiple of the group or the K tile, T
not a multiple of the vector, odd R), extremes of the int16 sums, any thread count, every ISA."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.kernels import dequant_factors, pack_ternary, quantize_rows, ternary_linear, ternary_matmul_ref
from ternpool.kernels import config
from ternpool.kernels.isa import ISAS
from ternpool.kernels.lut import COLS, LANES, _GROUPS, lut_linear, lut_matmul, lut_matmul_ref

from helpers import assert_exact_under_isa, assert_same_with_any_thread_count, readonly

pytestmark = pytest.mark.unit

TILE = COLS * _GROUPS  # columns per K tile
# K: below one group, odd, a whole tile plus a tail column, partial last tile, several tiles
COLUMNS = [1, 3, 127, TILE + 1, 3 * TILE - COLS - 1, 5 * TILE]
# T: one token, below and just past one vector, a slice of two vectors, past it
TOKENS = [1, 3, LANES + 1, 2 * LANES, 2 * LANES + 5]


@pytest.mark.parametrize("rows", [4, 12, 516])  # R = 1, 3, 129 packed rows
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_lut_matmul_is_exact(rows, cols, tokens):
    rng = np.random.default_rng(rows + 7 * cols + 13 * tokens)
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    want = ternary_matmul_ref(packed, q)
    assert np.array_equal(lut_matmul_ref(packed, q), want)
    assert np.array_equal(lut_matmul(readonly(packed), readonly(q)), want)


def test_largest_int16_sums_and_code_three_are_exact():
    # a whole K tile of weights +1 (code 2) and of code 3 (read as +2) against -128: the largest
    # int16 sums of a tile; 4 tiles and a tail column
    cols = 4 * TILE + 1
    packed = np.full((6, cols), 0xAA, np.uint8)
    packed[1] = 0xFF
    packed[2] = 0x00  # weight -1 everywhere
    q = np.full((2 * LANES + 1, cols), -128, np.int8)
    q[1] = 127
    assert np.array_equal(lut_matmul(packed, q), ternary_matmul_ref(packed, q))


@pytest.mark.parametrize("rows,cols,tokens", [(4, 1, 1), (516, 129, 3), (640, 2560, 8), (12, 333, 2 * LANES + 3)])
def test_lut_linear_is_bit_identical_to_ternary_linear(rows, cols, tokens):
    rng = np.random.default_rng(rows + cols)
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    q, qsum, scale = quantize_rows(rng.standard_normal((tokens, cols)).astype(np.float32))
    for divides in (False, True):
        div, mul = dequant_factors(scale, 0.0371, divides)
        got = lut_linear(packed, q, qsum, div, mul)
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.int32), ternary_linear(packed, q, qsum, div, mul).view(np.int32))


def test_lut_batched_rows_equal_unbatched():
    rng = np.random.default_rng(9)
    packed = pack_ternary(rng.integers(-1, 2, size=(64, 2 * TILE + 3)))
    q, qsum, scale = quantize_rows(rng.standard_normal((LANES + 7, packed.shape[1])).astype(np.float32))
    div, mul = dequant_factors(scale, 0.5, False)
    batched = lut_linear(packed, q, qsum, div, mul)
    for t in (0, LANES - 1, LANES + 6):
        one = lut_linear(packed, q[t:t + 1], qsum[t:t + 1], div[t:t + 1], mul)
        assert np.array_equal(batched[t:t + 1], one)


def test_lut_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(5)
    packed = pack_ternary(rng.integers(-1, 2, size=(256, 300)))
    q = rng.integers(-128, 128, size=(5, 300)).astype(np.int8)
    assert_same_with_any_thread_count(lut_matmul, packed, q)


_OTHER_ISA_CHECK = """
import numpy as np
from ternpool.kernels import config, pack_ternary, ternary_matmul_ref
from ternpool.kernels.lut import COLS, LANES, _GROUPS, lut_matmul
rng = np.random.default_rng(0)
for rows, cols, tokens in [(4, 1, 1), (12, 3 * COLS * _GROUPS - 3, LANES + 1), (516, 129, 2 * LANES + 5)]:
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    packed[0] = 0xFF
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[0] = -128
    assert np.array_equal(lut_matmul(packed, q), ternary_matmul_ref(packed, q)), (rows, cols, tokens)
print("exact with", config.ISA)
"""


@pytest.mark.parametrize("isa", [name for name in ISAS if name != config.ISA])
def test_lut_under_other_isas_is_exact_too(isa, tmp_path):
    assert_exact_under_isa(isa, _OTHER_ISA_CHECK, tmp_path)
