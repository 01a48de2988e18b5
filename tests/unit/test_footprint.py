"""Memory a worker needs, from the config alone, and the refusal message of the pool."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ternpool.engine import ModelConfig
from ternpool.engine.footprint import fit_problem, footprint, linear_bytes
from ternpool.engine.shapes import kv_bytes_per_slot
from ternpool.engine.native import convert
from ternpool.engine.native import WEIGHTS_FILE

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("fmt", ["2bit", "1.6bit"])
def test_linear_bytes_match_a_converted_file(model_factory, tmp_path, fmt):
    src = model_factory("odd-packed-bitlinear")
    cfg = ModelConfig.from_dir(src)
    out = convert(src, tmp_path / fmt, fmt)
    from ternpool.engine.native import load_native

    assert load_native(out, cfg).linear_bytes == linear_bytes(cfg, fmt)
    assert (out / WEIGHTS_FILE).stat().st_size > linear_bytes(cfg, fmt)


def test_100b_needs_1_6_bit_weights_on_a_24_gib_node():
    from ternpool.engine.modelgen import SHAPES, _config

    tok = SimpleNamespace(bos_token_id=128000, eos_token_id=128001)
    cfg = ModelConfig.from_dict(_config(SHAPES["100b"], "packed", "autobitlinear", tok))
    assert 23e9 < linear_bytes(cfg, "2bit") < 26e9  # "2-bit weights alone are 25 GB" (with the embedding)
    assert linear_bytes(cfg, "1.6bit") < 0.82 * linear_bytes(cfg, "2bit")
    node = 24 * 2 ** 30 - 2 * 2 ** 30  # 24 GiB, 2 GiB object store
    assert fit_problem(cfg, "1.6bit", "int8", 4, 512, node) is None
    msg = fit_problem(cfg, "2bit", "bf16", 4, 512, node)
    assert "weights" in msg and "2bit, bf16 head" in msg and "--weights-format 1.6bit --head int8" in msg


def test_message_says_what_would_fit(model_factory):
    cfg = ModelConfig.from_dir(model_factory("tiny-packed-auto"))
    fp = footprint(cfg, "2bit", "bf16", 1, 2048)
    per_slot = kv_bytes_per_slot(cfg, 2048)
    node = fp.total + 9 * per_slot + per_slot // 2  # room for 10 slots in all
    assert fit_problem(cfg, "2bit", "bf16", 10, 2048, node) is None
    msg = fit_problem(cfg, "2bit", "bf16", 11, 2048, node, object_store=10 ** 9)
    assert "11 slots x 2048 tokens" in msg and "--slots 10 at this context" in msg
    room = node - fp.weights - fp.runtime  # what the KV cache may use
    assert "object store takes 1.00 GB" in msg
    per_token = kv_bytes_per_slot(cfg, 16) // 16  # the cache holds whole blocks of 16 positions
    assert f"--max-context {room // (11 * per_token) // 16 * 16} with 11 slots" in msg
    assert "(11 slots x 2048 tokens, f32)" in msg and "--kv-cache bf16 (half the KV cache)" in msg


def test_a_bf16_kv_cache_takes_half_the_bytes(model_factory):
    cfg = ModelConfig.from_dir(model_factory("tiny-packed-auto"))
    f32, bf16 = footprint(cfg, "2bit", "bf16", 10, 2048), footprint(cfg, "2bit", "bf16", 10, 2048, "bf16")
    assert bf16.weights == f32.weights and bf16.kv_cache * 2 == f32.kv_cache == 10 * kv_bytes_per_slot(cfg, 2048)
    node = bf16.total  # 10 bf16 slots fit exactly, 10 f32 slots do not
    assert fit_problem(cfg, "2bit", "bf16", 10, 2048, node, kv_cache="bf16") is None
    assert "--kv-cache bf16" in fit_problem(cfg, "2bit", "bf16", 10, 2048, node)
    msg = fit_problem(cfg, "2bit", "bf16", 11, 2048, node, kv_cache="bf16")
    assert "(11 slots x 2048 tokens, bf16)" in msg and "--slots 10 at this context" in msg
    assert "--kv-cache bf16" not in msg and f"--kv-cache int8 (KV cache {11 * kv_bytes_per_slot(cfg, 2048, 'int8') / 1e9:.2f} GB)" in msg


def test_an_int8_kv_cache_fits_about_four_times_the_slots():
    """2b4t: 153.6 kB a token of float32 K and V, 39.6 kB of int8 (30 layers x K and V x 5 KV heads x (128
    values + a 4-byte scale)): automatic slots and the memory check fit 3.9x the float32 slots."""
    from ternpool.engine.engine import auto_slots
    from ternpool.engine.modelgen import SHAPES, _config

    tok = SimpleNamespace(bos_token_id=128000, eos_token_id=128001)
    cfg = ModelConfig.from_dict(_config(SHAPES["2b4t"], "packed", "autobitlinear", tok))
    assert [kv_bytes_per_slot(cfg, 16, kv) // 16 for kv in ("f32", "bf16", "int8")] == [153_600, 76_800, 39_600]
    assert kv_bytes_per_slot(cfg, 1) == kv_bytes_per_slot(cfg, 16)  # whole blocks
    memory = 2 * 5 * kv_bytes_per_slot(cfg, 2048)  # automatic slots take half: 5 float32 slots
    assert [auto_slots(cfg, 2048, memory, kv) for kv in ("f32", "bf16", "int8")] == [5, 10, 19]
    node = footprint(cfg, "2bit", "int8", 19, 2048, "int8").total  # 19 int8 slots fit exactly
    assert fit_problem(cfg, "2bit", "int8", 19, 2048, node, kv_cache="int8") is None
    msg = fit_problem(cfg, "2bit", "int8", 20, 2048, node, kv_cache="int8")
    assert "(20 slots x 2048 tokens, int8)" in msg and "--slots 19 at this context" in msg and "--kv-cache" not in msg
    msg = fit_problem(cfg, "2bit", "int8", 19, 2048, node)  # the same slots in float32: 4.9 of them fit
    assert "--slots 4 at this context" in msg and "--kv-cache int8 (KV cache 1.54 GB)" in msg
