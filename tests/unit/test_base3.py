"""Base-3 (1.6-bit) packing and its Numba kernel against the NumPy reference: exact, odd sizes included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ternpool.kernels import (
    base3_linear,
    base3_linear_ref,
    base3_matmul,
    base3_matmul_ref,
    dequant_factors,
    pack_base3,
    quantize_rows,
    unpack_base3,
)
from ternpool.kernels.base3 import decode_base3, encode_base3, packed_cols
from ternpool.kernels import config
from ternpool.kernels.isa import ISAS

from helpers import assert_exact_under_isa, assert_same_with_any_thread_count, readonly


pytestmark = pytest.mark.unit

COLS = [1, 31, 32, 159, 160, 161, 320, 333, 2560, 6912]


def _ternary(rng, rows, cols):
    return rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)


def _activations(rng, tokens, cols):
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[0, :] = -128  # extremes: code 2 x -128 in every pair and every digit must not saturate
    if tokens > 1:
        q[1, :] = 127
    return q


def test_all_243_values_encode_and_decode_exactly():
    digits = np.array(list(itertools.product(range(3), repeat=5)), dtype=np.uint8)  # d0 is most significant
    v = digits.astype(np.int64) @ np.array([81, 27, 9, 3, 1])
    assert np.array_equal(v, np.arange(243))
    b = encode_base3(digits)
    assert b.dtype == np.uint8
    assert np.array_equal(b.astype(np.int64), -(-v * 256 // 243))  # ceil(v * 256 / 243)
    assert b.max() == 255 and len(np.unique(b)) == 243
    assert np.array_equal(decode_base3(b), digits)
    # the decode formula, spelled out once for a byte
    x = int(b[100])
    got = []
    for _ in range(5):
        got.append((x * 3) >> 8)
        x = (x * 3) & 255
    assert got == digits[100].tolist()
    # every byte (not only the 243 encodings) decodes to digits in {0, 1, 2}
    assert decode_base3(np.arange(256, dtype=np.uint8)).max() == 2


@pytest.mark.parametrize("rows", [1, 3, 5, 7])
@pytest.mark.parametrize("cols", COLS)
def test_pack_roundtrip_and_layout(rows, cols):
    rng = np.random.default_rng(rows * 10000 + cols)
    w = _ternary(rng, rows, cols)
    packed = pack_base3(w)
    nblk = -(-cols // 160)
    assert packed.shape == (rows, 32 * nblk) == (rows, packed_cols(cols)) and packed.dtype == np.uint8
    assert packed.flags.c_contiguous
    assert np.array_equal(unpack_base3(packed, cols), w)
    # byte i of block j, digit k <-> column 160 j + 32 k + i; columns past K hold code 1
    codes = np.ones((rows, 160 * nblk), np.int64)
    codes[:, :cols] = w + 1
    digits = decode_base3(packed).astype(np.int64)  # (rows, 32 nblk, 5)
    for j in range(nblk):
        for k in range(5):
            assert np.array_equal(digits[:, 32 * j:32 * j + 32, k], codes[:, 160 * j + 32 * k:160 * j + 32 * k + 32])


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_base3(np.full((2, 3), 2, np.int8))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_base3(np.full((2, 3), -2, np.int8))
    with pytest.raises(ValueError, match="2-D"):
        pack_base3(np.zeros(5, np.int8))
    with pytest.raises(ValueError, match="64 bytes per row"):
        unpack_base3(np.zeros((2, 32), np.uint8), 161)
    assert pack_base3(np.zeros((3, 0), np.int8)).shape == (3, 0)


@pytest.mark.parametrize("cols", COLS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])
def test_base3_matmul_is_exact(cols, tokens):
    rng = np.random.default_rng(cols + 7 * tokens)
    rows = 37
    w = _ternary(rng, rows, cols)
    packed = pack_base3(w)
    q = _activations(rng, tokens, cols)
    want = (q.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    assert np.array_equal(base3_matmul_ref(packed, q), want)
    got = base3_matmul(readonly(packed), readonly(q))
    assert got.dtype == np.int32 and np.array_equal(got, want)


@pytest.mark.parametrize("tokens", [5, 6, 7, 13])
def test_token_groups_of_four_two_and_one(tokens):
    rng = np.random.default_rng(tokens)
    packed = pack_base3(_ternary(rng, 19, 493))  # 3 blocks, 2 tail digits, 13 scalar columns
    q = _activations(rng, tokens, 493)
    assert np.array_equal(base3_matmul(packed, q), base3_matmul_ref(packed, q))


@pytest.mark.parametrize("cols", [493, 8192, 45568])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 16, 17, 18, 19, 31, 33, 35])
def test_batch_one_decodes_rows_in_groups(rows, cols):
    """T = 1 decodes rows r, r + h, r + 2h, r + 3h of a task per call, then 2 neighbours, then 1:
    every count of rows left over in a task. 493 = 3 blocks, 2 tail digits and 13 scalar columns;
    8192 = 51 blocks (4 chunks of 12, then 3) and 1 tail digit; 45568 = 284 blocks and 4 tail digits."""
    rng = np.random.default_rng(rows * 7 + cols)
    w = _ternary(rng, rows, cols)
    packed = pack_base3(w)
    q = _activations(rng, 1, cols)
    want = (q.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    assert np.array_equal(base3_matmul(packed, q), want)
    for qrow in (np.full((1, cols), 127, np.int8), rng.integers(-128, 128, size=(1, cols)).astype(np.int8)):
        assert np.array_equal(base3_matmul(packed, qrow), base3_matmul_ref(packed, qrow))
    q, qsum, scale = quantize_rows(rng.standard_normal((1, cols)).astype(np.float32))
    for divides in (False, True):
        div, mul = dequant_factors(scale, 0.0371, divides)
        np.testing.assert_array_equal(base3_linear(packed, q, qsum, div, mul), base3_linear_ref(packed, q, div, mul))


@pytest.mark.parametrize("rows", [2047, 2048, 2048 + 37, 2048 + 38, 2048 + 39, 4096 + 130])
def test_batch_one_with_long_tasks(rows):
    """From 16 * 128 rows on, batch-1 tasks hold 128 rows (the last one fewer, any count)."""
    rng = np.random.default_rng(rows)
    packed = pack_base3(_ternary(rng, rows, 493))
    q = _activations(rng, 1, 493)
    assert np.array_equal(base3_matmul(packed, q), base3_matmul_ref(packed, q))
    q, qsum, scale = quantize_rows(rng.standard_normal((1, 493)).astype(np.float32))
    div, mul = dequant_factors(scale, 0.0371, True)
    np.testing.assert_array_equal(base3_linear(packed, q, qsum, div, mul), base3_linear_ref(packed, q, div, mul))


def test_batch_one_pairs_see_their_own_rows():
    """Neighbouring rows with opposite / unrelated weights must not leak into each other's sums."""
    cols = 45568 - 13
    rng = np.random.default_rng(1)
    base = _ternary(rng, 1, cols)
    w = np.concatenate([base, -base, np.zeros_like(base), np.ones_like(base), -np.ones_like(base),
                        _ternary(rng, 6, cols)]).astype(np.int8)  # 11 rows: 2 groups of 4, 2, 1
    packed = pack_base3(w)
    for q in (_activations(rng, 1, cols), np.full((1, cols), -128, np.int8)):
        want = (q.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
        assert np.array_equal(base3_matmul(packed, q), want)


def test_batch_one_matches_batched_rows():
    """Each token of a batch gives the same int32 sums alone (batch-1 path) as in a group of 8, 4, 2."""
    rng = np.random.default_rng(2)
    packed = pack_base3(_ternary(rng, 41, 8192 + 7))
    q = _activations(rng, 15, 8192 + 7)
    together = base3_matmul(packed, q)
    assert np.array_equal(together, base3_matmul_ref(packed, q))
    for t in range(15):
        assert np.array_equal(base3_matmul(packed, q[t:t + 1]), together[t:t + 1])


def test_extreme_weights_and_activations():
    for cols in (160, 333, 2560):
        for wval in (-1, 1):
            packed = pack_base3(np.full((3, cols), wval, np.int8))
            for qval in (-128, 127):
                q = np.full((2, cols), qval, np.int8)
                assert np.array_equal(base3_matmul(packed, q), np.full((2, 3), wval * qval * cols, np.int32))


def test_any_bytes_agree_with_the_reference():
    # bytes that pack_base3 never writes (v > 242, non-canonical padding) decode the same way in both
    rng = np.random.default_rng(11)
    for cols in (7, 161, 333, 700):
        packed = rng.integers(0, 256, size=(9, packed_cols(cols))).astype(np.uint8)
        q = _activations(rng, 6, cols)
        assert np.array_equal(base3_matmul(packed, q), base3_matmul_ref(packed, q))


def test_non_contiguous_inputs_and_given_qsum():
    rng = np.random.default_rng(3)
    packed = pack_base3(_ternary(rng, 10, 400))
    q = _activations(rng, 4, 800)[:, ::2]
    wide = np.zeros((10, 2 * packed.shape[1]), np.uint8)
    wide[:, ::2] = packed
    want = base3_matmul_ref(packed, q)
    assert np.array_equal(base3_matmul(wide[:, ::2], q), want)
    qsum = q.astype(np.int32).sum(axis=1)
    assert np.array_equal(base3_matmul(packed, q, qsum), want)


def test_shapes_are_validated():
    packed = np.zeros((4, 64), np.uint8)
    with pytest.raises(ValueError, match="for K=160 must have 32 bytes per row"):
        base3_matmul(packed, np.zeros((1, 160), np.int8))
    with pytest.raises(ValueError, match="for K=321 must have 96 bytes per row"):
        base3_matmul(packed, np.zeros((1, 321), np.int8))
    with pytest.raises(ValueError, match="activations must be 2-D int8"):
        base3_matmul(packed, np.zeros((1, 200), np.int16))
    with pytest.raises(ValueError, match="packed weights must be 2-D uint8"):
        base3_matmul(packed.astype(np.int8), np.zeros((1, 200), np.int8))
    with pytest.raises(ValueError, match="qsum must have shape"):
        base3_matmul(packed, np.zeros((2, 200), np.int8), np.zeros(3, np.int32))
    q = np.zeros((2, 200), np.int8)
    with pytest.raises(ValueError, match="div must have shape"):
        base3_linear(packed, q, np.zeros(2, np.int32), np.ones(3, np.float32), 1.0)
    with pytest.raises(ValueError, match="out must be"):
        base3_linear(packed, q, np.zeros(2, np.int32), np.ones(2, np.float32), 1.0, out=np.empty((4, 2), np.float32))
    assert base3_matmul(packed, q).shape == (2, 4)
    assert base3_matmul(np.zeros((4, 0), np.uint8), np.zeros((2, 0), np.int8)).tolist() == [[0] * 4] * 2


@pytest.mark.parametrize("rows,cols,tokens", [(1, 1, 1), (7, 333, 3), (640, 2560, 8), (96, 6912, 2)])
def test_base3_linear_matches_reference(rows, cols, tokens):
    rng = np.random.default_rng(rows)
    w = _ternary(rng, rows, cols)
    packed = pack_base3(w)
    q, qsum, scale = quantize_rows(rng.standard_normal((tokens, cols)).astype(np.float32))
    for divides in (False, True):
        div, mul = dequant_factors(scale, 0.0371, divides)
        got = base3_linear(packed, q, qsum, div, mul)
        np.testing.assert_array_equal(got, base3_linear_ref(packed, q, div, mul))
        out = np.full((tokens, rows), np.nan, np.float32)
        assert base3_linear(packed, q, qsum, div, mul, out=out) is out
        np.testing.assert_array_equal(out, got)


def test_base3_linear_agrees_with_the_2bit_kernel():
    from ternpool.kernels import pack_ternary, ternary_linear

    rng = np.random.default_rng(8)
    w = _ternary(rng, 64, 1000)
    q, qsum, scale = quantize_rows(rng.standard_normal((5, 1000)).astype(np.float32))
    div, mul = dequant_factors(scale, 0.5, False)
    np.testing.assert_array_equal(base3_linear(pack_base3(w), q, qsum, div, mul),
                                  ternary_linear(pack_ternary(w), q, qsum, div, mul))


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(5)
    packed = pack_base3(_ternary(rng, 256, 500))
    q = _activations(rng, 5, 500)
    assert_same_with_any_thread_count(base3_matmul, packed, q)


_OTHER_ISA_CHECK = """
import os

import numpy as np
from ternpool.kernels import config
from ternpool.kernels.base3 import base3_linear, base3_linear_ref, base3_matmul, base3_matmul_ref, pack_base3
assert config.ISA == os.environ["TERNPOOL_ISA"], config.ISA
rng = np.random.default_rng(3)
for rows, cols, tokens in [(1, 1, 1), (3, 31, 2), (5, 161, 3), (7, 333, 8), (33, 2560, 5), (4, 6912, 1),
                           (2, 160, 1), (3, 493, 1), (19, 493, 1), (35, 8192, 1), (6, 45568, 1), (17, 45555, 1),
                           (2048 + 39, 161, 1)]:
    packed = pack_base3(rng.integers(-1, 2, size=(rows, cols)))
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[0] = -128
    assert np.array_equal(base3_matmul(packed, q), base3_matmul_ref(packed, q)), (rows, cols, tokens)
    qsum = q.astype(np.int32).sum(1)
    div = rng.uniform(0.5, 2, tokens).astype(np.float32)
    assert np.array_equal(base3_linear(packed, q, qsum, div, 0.25), base3_linear_ref(packed, q, div, 0.25))
print("exact with", config.ISA)
"""


@pytest.mark.parametrize("isa", [name for name in ISAS if name != config.ISA])
def test_other_isas_are_exact_too(isa, tmp_path):
    """Every instruction set besides the one tested above in-process, where this CPU can run it."""
    assert_exact_under_isa(isa, _OTHER_ISA_CHECK, tmp_path)


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("cols", [1, 159, 160, 319, 320, 333, 480, 493, 2560, 6912])
def test_grouped_layout_matches_its_reference_and_the_definition(group, cols):
    """`group_digits` (what the kernel reads where a vector holds several blocks) against its NumPy
    reference, and that reference against the layout spelled out column by column."""
    from ternpool.kernels.base3 import group_digits, group_digits_ref

    rng = np.random.default_rng(cols * 3 + group)
    q = rng.integers(-128, 128, size=(3, cols)).astype(np.int8)
    want = q.copy()
    run = 160 * group
    for s in range(0, cols // run * run, run):
        for k in range(5):
            for h in range(group):
                dst = s + 32 * (k * group + h)
                want[:, dst:dst + 32] = q[:, s + 160 * h + 32 * k:s + 160 * h + 32 * k + 32]
    assert np.array_equal(group_digits_ref(q, group), want)
    got = group_digits(readonly(q), group)
    assert got.dtype == np.int8 and np.array_equal(got, want)
    if group == 1 or cols < run:
        assert np.array_equal(got, q)
    else:
        assert not np.array_equal(got, q)
