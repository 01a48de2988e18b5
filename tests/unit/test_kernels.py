"""Every Numba kernel against its NumPy reference: exact for integer paths, odd sizes included."""

from __future__ import annotations

import numpy as np
import pytest

from ternpool.kernels import (
    attention,
    attention_ref,
    bf16_matmul,
    bf16_matmul_ref,
    bf16_to_f32,
    dequant_factors,
    f32_to_bf16,
    pack_ternary,
    quantize_rows,
    quantize_rows_ref,
    set_threads,
    ternary_linear,
    ternary_linears,
    ternary_linear_ref,
    ternary_matmul,
    ternary_matmul_ref,
    unpack_ternary,
)
from ternpool.kernels import config
from ternpool.kernels.isa import ISAS
from ternpool.kernels.kv8 import dequantize_kv, quantize_kv

from helpers import assert_exact_under_isa, assert_same_with_any_thread_count, readonly


pytestmark = pytest.mark.unit

ODD = [1, 3, 127, 129]


@pytest.mark.parametrize("rows", [4, 12, 508, 516])
@pytest.mark.parametrize("cols", ODD)
def test_pack_roundtrip_and_hf_layout(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    w = rng.integers(-1, 2, size=(rows, cols)).astype(np.int8)
    packed = pack_ternary(w)
    assert packed.shape == (rows // 4, cols) and packed.dtype == np.uint8
    assert np.array_equal(unpack_ternary(packed), w)
    # HF layout: row i*R + r sits in bits 2i..2i+1 of packed[r]
    R = rows // 4
    for i in range(4):
        assert np.array_equal(((packed >> (2 * i)) & 3).astype(np.int8) - 1, w[i * R:(i + 1) * R])


def test_pack_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(np.zeros((6, 3), np.int8))
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(np.full((4, 3), 2, np.int8))


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("cols", ODD + [2560])
def test_quantize_matches_reference_exactly(tokens, cols):
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((tokens, cols)) * rng.uniform(0.01, 100, (tokens, 1))).astype(np.float32)
    x[0, 0] = 0.0
    got, ref = quantize_rows(readonly(x)), quantize_rows_ref(x)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and np.array_equal(g, r)
    q, qsum, scale = got
    assert q.min() >= -128 and q.max() <= 127 and np.array_equal(qsum, q.astype(np.int32).sum(1))
    nonzero = np.abs(x).max(axis=1) > 0
    assert np.all(np.abs(q[nonzero]).max(axis=1) == 127)  # the absmax element maps to +-127


def test_quantize_rounds_half_to_even_and_handles_zero_rows():
    # amax 127 -> scale exactly 1, so x*s is x: halves round to even like torch.round
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]], np.float32)
    q, _, scale = quantize_rows(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]
    assert scale[0] == np.float32(1.0)
    zq, zsum, zscale = quantize_rows(np.zeros((2, 5), np.float32))
    assert not zq.any() and not zsum.any() and np.all(zscale == np.float32(127.0) / np.float32(1e-5))


@pytest.mark.parametrize("rows", [4, 12, 508, 516])
@pytest.mark.parametrize("cols", ODD)
@pytest.mark.parametrize("tokens", [1, 3, 33])
def test_ternary_matmul_is_exact(rows, cols, tokens):
    rng = np.random.default_rng(rows + 7 * cols + 13 * tokens)
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[0, :] = -128  # extremes: codes 2 x -128 must not overflow
    assert np.array_equal(ternary_matmul(readonly(packed), readonly(q)), ternary_matmul_ref(packed, q))


@pytest.mark.parametrize("rows,cols,tokens", [(4, 1, 1), (516, 129, 3), (640, 2560, 8)])
def test_ternary_linear_matches_reference(rows, cols, tokens):
    rng = np.random.default_rng(rows)
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    q, qsum, scale = quantize_rows(rng.standard_normal((tokens, cols)).astype(np.float32))
    for divides in (False, True):
        div, mul = dequant_factors(scale, 0.0371, divides)
        got = ternary_linear(packed, q, qsum, div, mul)
        assert np.array_equal(got, ternary_linear_ref(packed, q, div, mul))
        effective = 1 / 0.0371 if divides else 0.0371
        np.testing.assert_allclose(got, ternary_matmul_ref(packed, q) / scale[:, None] * effective, rtol=1e-6)


@pytest.mark.parametrize("cols", [1056, 2100])  # 33 and 65 blocks: several int16 chunks, then a tail
@pytest.mark.parametrize("tokens", [2, 4, 5])  # token pairs, and a last odd token
def test_long_rows_and_token_tiles_are_exact(cols, tokens):
    rng = np.random.default_rng(cols + tokens)
    packed = pack_ternary(rng.integers(-1, 2, size=(8, cols)))
    packed[0] = 0xAA  # all codes 2 (weight +1) in row group 0 ...
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[-1, :] = -128  # ... against -128 everywhere: the largest int16 partial sums
    assert np.array_equal(ternary_matmul(packed, q), ternary_matmul_ref(packed, q))
    qs = np.zeros((tokens, 2 * cols), np.int8)[:, ::2]  # strided activations are copied, not misread
    qs[:] = q
    qsum = q.astype(np.int32).sum(axis=1).astype(np.int32)
    div = np.ones(tokens, np.float32)
    assert np.array_equal(ternary_linear(packed, qs, qsum, div, 1.0), ternary_linear_ref(packed, q, div, 1.0))


def test_code_three_reads_as_plus_two_like_the_reference():
    # code 3 never appears in valid checkpoints; kernel and reference must still agree on it
    packed = np.full((1, 5), 0xFF, np.uint8)
    q = np.arange(-2, 3, dtype=np.int8)[None, :] * 3
    assert np.array_equal(ternary_matmul(packed, q), ternary_matmul_ref(packed, q))


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(5)
    packed = pack_ternary(rng.integers(-1, 2, size=(256, 300)))
    q = rng.integers(-128, 128, size=(5, 300)).astype(np.int8)
    assert_same_with_any_thread_count(ternary_matmul, packed, q)
    with pytest.raises(ValueError, match="threads must be between"):
        set_threads(0)


def test_bf16_conversion_round_trip_and_rounding():
    exact = np.array([1.0, -2.5, 3.140625, 0.0, -0.0078125], np.float32)  # representable in bf16
    assert np.array_equal(bf16_to_f32(f32_to_bf16(exact)), exact)
    # round to nearest even at the 16-bit boundary
    assert f32_to_bf16(np.array([np.float32(1.0) + np.float32(2 ** -8)]))[0] == 0x3F80  # tie -> even
    assert f32_to_bf16(np.array([np.float32(1.0) + np.float32(3 * 2 ** -8)]))[0] == 0x3F82
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


@pytest.mark.parametrize("vocab,hidden,tokens", [(1, 1, 1), (129, 67, 3), (1000, 256, 2)])
def test_bf16_head_matches_reference(vocab, hidden, tokens):
    rng = np.random.default_rng(vocab)
    w = f32_to_bf16(rng.standard_normal((vocab, hidden)).astype(np.float32))
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    np.testing.assert_allclose(bf16_matmul(readonly(w), h), bf16_matmul_ref(w, h), rtol=1e-5, atol=1e-4)


def test_bf16_head_is_batch_invariant():
    rng = np.random.default_rng(1)
    w = f32_to_bf16(rng.standard_normal((300, 130)).astype(np.float32))
    h = rng.standard_normal((7, 130)).astype(np.float32)
    full = bf16_matmul(w, h)
    for t in range(7):
        assert np.array_equal(bf16_matmul(w, h[t:t + 1])[0], full[t])


ATTENTION_TOL = dict(rtol=1e-5, atol=1e-5)  # float32 kernel (softmax sum in float64) against the float64 reference


def _attention_inputs(heads, kv_heads, dim, cache, seed=0):
    rng = np.random.default_rng(seed + heads * 100 + dim)
    kc, vc = (rng.standard_normal((3, kv_heads, 41, dim)).astype(np.float32) for _ in range(2))
    if cache == "bf16":
        kc, vc = f32_to_bf16(kc), f32_to_bf16(vc)
    if cache == "int8":
        kc[1, 0, 2] = 0.0  # an all-zero row: scale 0
        kc, vc = quantize_kv(kc), quantize_kv(vc)
    q = rng.standard_normal((7, heads, dim)).astype(np.float32)
    slots, pos = np.array([0, 2, 2, 1, 0, 1, 2]), np.array([0, 40, 3, 5, 9, 1, 26])
    return q, kc, vc, slots, pos


@pytest.mark.parametrize("cache", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (5, 1, 12), (6, 3, 10), (3, 3, 7), (20, 5, 128),
                                                (3, 1, 1)])
def test_attention_matches_reference(heads, kv_heads, dim, cache):
    q, kc, vc, slots, pos = _attention_inputs(heads, kv_heads, dim, cache)
    np.testing.assert_allclose(attention(q, readonly(kc), readonly(vc), slots, pos, dim ** -0.5),
                               attention_ref(q, kc, vc, slots, pos, dim ** -0.5), **ATTENTION_TOL)
    with pytest.raises(ValueError, match="past the cache length"):
        attention(q, kc, vc, slots, np.full(7, 41), 1.0)


def test_attention_bf16_cache_is_its_widened_float32_cache():
    """A bf16 cache computes exactly what the float32 cache of the same (widened) values does."""
    q, kc, vc, slots, pos = _attention_inputs(20, 5, 128, "bf16")
    assert np.array_equal(attention(q, kc, vc, slots, pos, 0.1),
                          attention(q, bf16_to_f32(kc), bf16_to_f32(vc), slots, pos, 0.1))
    with pytest.raises(ValueError, match="must both be float32, both uint16"):
        attention(q, kc, bf16_to_f32(vc), slots, pos, 0.1)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (5, 1, 12), (6, 3, 10), (3, 3, 7), (20, 5, 128),
                                                (2, 1, 129), (3, 1, 5), (3, 1, 1)])
def test_attention_int8_cache_batches_exactly(heads, kv_heads, dim):
    """With an int8 cache (kernels/kv8.py rows: values and scale) every heads-per-task split gives the same
    bits, and each token alone gets what it gets in the batch."""
    from ternpool.kernels.attention import _attention_parallel, _attention_serial, block_table

    q, kc, vc, slots, pos = _attention_inputs(heads, kv_heads, dim, "int8")
    assert kc.dtype == np.int8 and kc.shape[-1] == dim + 4
    batched = attention(q, readonly(kc), readonly(vc), slots, pos, 0.1)
    for per_task in (p for p in range(1, heads // kv_heads + 1) if (heads // kv_heads) % p == 0):
        for run in (_attention_serial, _attention_parallel):
            out = np.empty_like(q)
            run(q, kc, vc, block_table(kc), slots, pos, np.float32(0.1), per_task, out)
            assert np.array_equal(out, batched), (per_task, run)
    for n in range(len(q)):
        assert np.array_equal(attention(q[n:n + 1], kc, vc, slots[n:n + 1], pos[n:n + 1], 0.1)[0], batched[n])
    with pytest.raises(ValueError, match="does not fit cache shapes"):
        attention(q, kc[..., :dim], vc[..., :dim], slots, pos, 0.1)  # rows without their scale
    with pytest.raises(ValueError, match="both int8"):
        attention(q, kc, dequantize_kv(vc), slots, pos, 0.1)


def _paged(cache: np.ndarray, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The slotted cache (S, KVH, C, W) cut into blocks of `block` positions, stored in a shuffled pool
    (with spare blocks) and its block table (S, ceil(C / block))."""
    S, KVH, C, W = cache.shape
    per = -(-C // block)
    padded = np.zeros((S, KVH, per * block, W), cache.dtype)
    padded[:, :, :C] = cache
    blocks = padded.reshape(S, KVH, per, block, W).transpose(0, 2, 1, 3, 4).reshape(S * per, KVH, block, W)
    order = np.random.default_rng(seed).permutation(S * per + 3)  # block i of the slotted layout lives at pool[order[i]]
    pool = np.zeros((S * per + 3, KVH, block, W), cache.dtype)
    pool[order[:S * per]] = blocks
    return pool, order[:S * per].reshape(S, per)


@pytest.mark.parametrize("cache", ["f32", "bf16", "int8"])
@pytest.mark.parametrize("block", [1, 4, 16, 41, 64])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (20, 5, 128), (3, 1, 5)])
def test_paged_attention_is_slotted_attention(heads, kv_heads, dim, cache, block):
    """Attention through a block table over a shuffled pool of blocks gives bit for bit what the slotted
    cache gives (the same rows in the same order), and matches the reference reading the same table."""
    from ternpool.kernels.attention import _attention_parallel, _attention_serial, block_table

    q, kc, vc, slots, pos = _attention_inputs(heads, kv_heads, dim, cache)
    (kp, table), (vp, table_v) = _paged(kc, block, seed=block), _paged(vc, block, seed=block)
    assert np.array_equal(table, table_v)
    want = attention(q, kc, vc, slots, pos, 0.1)
    assert np.array_equal(attention(q, readonly(kp), readonly(vp), slots, pos, 0.1, table), want)
    for run in (_attention_serial, _attention_parallel):
        out = np.empty_like(q)
        run(q, kp, vp, block_table(kp, table), slots, pos, np.float32(0.1), 1, out)
        assert np.array_equal(out, want)
    np.testing.assert_allclose(attention_ref(q, kp, vp, slots, pos, 0.1, table),
                               attention_ref(q, kc, vc, slots, pos, 0.1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="block ids in"):
        attention(q, kp, vp, slots, pos, 0.1, table + len(kp))
    with pytest.raises(ValueError, match="past the cache length"):
        attention(q, kp, vp, slots, np.full(7, table.shape[1] * block), 0.1, table)


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (5, 1, 12), (6, 3, 10), (3, 3, 7), (20, 5, 128),
                                                (2, 1, 129), (3, 1, 5)])
def test_attention_int8_cache_is_its_dequantized_float32_cache(heads, kv_heads, dim):
    """An int8 cache computes bit for bit what the float32 cache of its dequantized values does: each row is
    widened into the same float32 values, then the same arithmetic. (Rows of 1 to 3 values differ in the
    last bit: fast-math unrolls those two compiled loops differently; the reference test covers them.)"""
    q, kc, vc, slots, pos = _attention_inputs(heads, kv_heads, dim, "int8")
    assert np.array_equal(attention(q, kc, vc, slots, pos, 0.1),
                          attention(q, dequantize_kv(kc), dequantize_kv(vc), slots, pos, 0.1))


def test_attention_heads_per_task_does_not_change_a_bit():
    """However many query heads of a group one task takes (the whole group, reading each K/V row once
    for all of them, or fewer when there are too few tasks for the threads), and whether the tasks run on
    the calling thread or on all of them, every head's arithmetic is the same: the result is bit for bit
    the same, and each token's does not depend on the batch."""
    from ternpool.kernels.attention import _attention_parallel, _attention_serial, block_table

    q, kc, vc, slots, pos = _attention_inputs(20, 5, 128, "f32")
    outs = []
    for per_task in (1, 2, 4):
        for run in (_attention_serial, _attention_parallel):
            out = np.empty_like(q)
            run(q, kc, vc, block_table(kc), slots, pos, np.float32(0.1), per_task, out)
            outs.append(out)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    for n in range(len(q)):  # one token alone (a split group on 2 threads) as in the batch
        assert np.array_equal(attention(q[n:n + 1], kc, vc, slots[n:n + 1], pos[n:n + 1], 0.1)[0], outs[0][n])


@pytest.mark.parametrize("tokens, kv_heads, group, threads, expected", [
    (32, 5, 4, 2, 4), (128, 5, 4, 2, 4),  # batched decode, prefill: whole groups
    (1, 5, 4, 2, 2),  # one sequence on 2 threads: 5 tasks would leave one thread idle 1/6 of the time
    (1, 5, 4, 16, 1), (1, 1, 5, 2, 1), (3, 2, 3, 2, 3)])
def test_heads_per_task(tokens, kv_heads, group, threads, expected):
    from ternpool.kernels.attention import heads_per_task

    assert heads_per_task(tokens, kv_heads, group, threads) == expected


_OTHER_ISA_CHECK = """
import os

import numpy as np
from ternpool.kernels import config, pack_ternary, ternary_matmul, ternary_matmul_ref
assert config.ISA == os.environ["TERNPOOL_ISA"], config.ISA
rng = np.random.default_rng(3)
for rows, cols, tokens in [(4, 1, 1), (12, 33, 3), (516, 129, 5), (8, 200, 3), (64, 2560, 2)]:
    packed = pack_ternary(rng.integers(-1, 2, size=(rows, cols)))
    q = rng.integers(-128, 128, size=(tokens, cols)).astype(np.int8)
    q[0] = -128
    assert np.array_equal(ternary_matmul(packed, q), ternary_matmul_ref(packed, q)), (rows, cols, tokens)
from ternpool.kernels.head8 import head_i8, head_i8_ref
for vocab, hidden, tokens in [(70, 97, 3), (9, 333, 2), (5, 64, 1)]:
    w = rng.integers(-127, 128, size=(vocab, hidden)).astype(np.int8)
    w[0], w[-1] = -127, 127
    ws = rng.uniform(0.5, 2, vocab).astype(np.float32)
    h = rng.standard_normal((tokens, hidden)).astype(np.float32)
    h[0] = -1.0  # quantizes to -127 everywhere
    assert np.array_equal(head_i8(w, ws, h), head_i8_ref(w, ws, h)), (vocab, hidden, tokens)
print("exact with", config.ISA)
"""


@pytest.mark.parametrize("isa", [name for name in ISAS if name != config.ISA])
def test_other_isas_are_exact_too(isa, tmp_path):
    """Every instruction set besides the one tested above in-process, where this CPU can run it."""
    assert_exact_under_isa(isa, _OTHER_ISA_CHECK, tmp_path)


def test_host_isa_is_detected():
    import os

    from ternpool.kernels.isa import host_isa

    assert config.ISA in ISAS
    assert config.ISA == (os.environ.get("TERNPOOL_ISA") or host_isa())


def test_attention_exp_is_within_three_float32_epsilons_of_exp_and_sums_in_float64():
    from ternpool.kernels.attention import _exp_shifted

    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-87, 0, 4001), [0.0, -1e-8, -0.3465, -0.3466, -86.9, -87.0]]).astype(np.float32)
    best = np.float32(2.5)
    got = x + best
    total = _exp_shifted(got, best, np.empty(len(x), np.int32))
    want = np.exp((x + best).astype(np.float64) - np.float64(best))
    assert np.max(np.abs(got - want) / want) <= 3 * 2.0 ** -23  # measured 2.4
    assert total == pytest.approx(np.sum(got.astype(np.float64)), rel=1e-15)
    far = np.array([-200.0, -1e30, -np.inf], np.float32)  # weights under 1e-38: (next to) zero, never NaN
    _exp_shifted(far, np.float32(0.0), np.empty(3, np.int32))
    assert np.all(np.isfinite(far)) and np.all(far < 1e-37)


@pytest.mark.parametrize("tokens", [1, 2, 3, 17, 40])
@pytest.mark.parametrize("cols", [1, 33, 2560])
def test_linears_sharing_activations_in_one_call_are_each_their_reference(tokens, cols):
    """q/k/v and gate/up run as one parallel call (`ternary_linears`): each output is bit for bit its own
    `ternary_linear` and the NumPy reference, whatever mix of row counts, scales and read-only weights
    (mapped files) and writable ones (made in memory); many tokens take the tiles where there are tiles."""
    rng = np.random.default_rng(tokens * 100 + cols)
    packs = [pack_ternary(rng.integers(-1, 2, (rows, cols)).astype(np.int8)) for rows in (8, 4, 12)]
    packs[1] = readonly(packs[1])
    q, qsum, scale = quantize_rows(rng.standard_normal((tokens, cols)).astype(np.float32))
    factors = [dequant_factors(scale, ws, divides) for ws, divides in ((0.5, False), (0.7, True), (1.3, False))]
    outs = ternary_linears(packs, q, qsum, *zip(*factors))
    for packed, (div, mul), out in zip(packs, factors, outs):
        assert out.tobytes() == ternary_linear_ref(packed, q, div, mul).tobytes()
        assert out.tobytes() == ternary_linear(packed, q, qsum, div, mul).tobytes()
    with pytest.raises(ValueError, match="too long for int32 sums"):
        ternary_matmul(np.zeros((1, 1 << 17), np.uint8), np.zeros((1, 1 << 17), np.int8))
