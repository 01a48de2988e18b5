"""Loading: both formats and conventions load; every malformed model fails with a message
naming the file and the tensor or key."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ternpool.engine import Engine, ModelConfig, ModelFormatError
from ternpool.engine.hub import resolve_model_dir
from ternpool.engine.safetensors_io import index_model
from ternpool.engine.weights import load_weights, ternarize
from ternpool.kernels import bf16_to_f32, unpack_ternary

from helpers import edit_json, rewrite_safetensors

pytestmark = pytest.mark.unit


def test_config_reads_the_real_2b4t_fields(tiny_model):
    cfg = ModelConfig.from_dir(tiny_model)
    assert cfg.linear_class == "autobitlinear" and cfg.quantization_mode == "offline"
    assert cfg.eos_token_ids == (cfg.eos_token_ids[0], cfg.eos_token_ids[0] + 8)  # eos and eot from generation_config
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 2


@pytest.mark.parametrize("change,match", [
    ({"model_type": "llama"}, "expected model_type 'bitnet'"),
    ({"architectures": ["LlamaForCausalLM"]}, "BitNetForCausalLM"),
    ({"hidden_act": "silu"}, "hidden_act must be 'relu2'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
    ({"hidden_size": None}, "missing required key 'hidden_size'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"quantization_config": None}, "quant_method 'bitnet'"),
])
def test_config_rejections(model_copy, change, match):
    edit_json(model_copy / "config.json", **change)
    with pytest.raises(ModelFormatError, match=match) as e:
        Engine.load(model_copy)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("change,match", [
    ({"linear_class": "fancylinear"}, "linear_class must be one of"),
    ({"quantization_mode": "sometimes"}, "quantization_mode must be one of"),
    ({"use_rms_norm": True}, "use_rms_norm"),
    ({"linear_class": "bitlinear", "quantization_mode": "online"}, "requires linear_class 'autobitlinear'"),
])
def test_quantization_config_rejections(model_copy, change, match):
    edit_json(model_copy / "config.json", "quantization_config", **change)
    with pytest.raises(ModelFormatError, match=match):
        ModelConfig.from_dir(model_copy)


def test_missing_linear_class_means_bitlinear(model_copy):
    edit_json(model_copy / "config.json", "quantization_config", linear_class=None)
    cfg = ModelConfig.from_dir(model_copy)
    assert cfg.linear_class == "bitlinear" and cfg.scale_divides


def test_linear_class_decides_what_weight_scale_means(model_copy):
    auto = load_weights(model_copy, ModelConfig.from_dir(model_copy))
    edit_json(model_copy / "config.json", "quantization_config", linear_class="bitlinear")
    div = load_weights(model_copy, ModelConfig.from_dir(model_copy))
    stored = float(bf16_to_f32(np.array(index_model(model_copy)["model.layers.0.self_attn.q_proj.weight_scale"]
                                        .load()))[0])
    assert auto.layers[0].q_proj.scale == pytest.approx(stored)
    assert div.layers[0].q_proj.scale == pytest.approx(1.0 / stored)


def test_missing_config_and_bad_json(tmp_path, model_copy):
    with pytest.raises(ModelFormatError, match="config.json: file not found"):
        ModelConfig.from_dir(tmp_path)
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="config.json: not valid JSON"):
        ModelConfig.from_dir(model_copy)


def test_missing_tensor_is_named(model_copy):
    rewrite_safetensors(model_copy, drop=["model.layers.1.mlp.down_proj.weight_scale"])
    with pytest.raises(ModelFormatError, match=r"missing tensor\(s\) \['model.layers.1.mlp.down_proj.weight_scale'\]"):
        Engine.load(model_copy)


def test_wrong_shape_and_dtype_are_named(model_copy):
    rewrite_safetensors(model_copy,
                        replace={"model.layers.0.self_attn.k_proj.weight": ("U8", np.zeros((4, 64), np.uint8))})
    with pytest.raises(ModelFormatError, match=r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight "
                                               r"is U8\[4, 64\], expected U8\[8, 64\]"):
        Engine.load(model_copy)
    rewrite_safetensors(model_copy,
                        replace={"model.layers.0.self_attn.k_proj.weight": ("I8", np.zeros((8, 64), np.int8))})
    with pytest.raises(ModelFormatError, match=r"k_proj.weight is I8\[8, 64\], expected U8"):
        Engine.load(model_copy)


def test_unknown_tensor_is_named(model_copy):
    rewrite_safetensors(model_copy, add={"lm_head.weight": ("BF16", np.zeros((512, 64), np.uint16))})
    with pytest.raises(ModelFormatError, match=r"unexpected tensor\(s\) \['lm_head.weight'\].*tied embeddings"):
        Engine.load(model_copy)


def test_truncated_file_names_file_and_tensor(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFormatError, match=r"model.safetensors: tensor '.*' ends at byte \d+ but the file has "
                                               r"\d+ bytes \(truncated file\)"):
        Engine.load(model_copy)
    f.write_bytes(data[:5])
    with pytest.raises(ModelFormatError, match="truncated safetensors file"):
        Engine.load(model_copy)


def test_output_size_not_multiple_of_four_is_rejected(model_copy):
    edit_json(model_copy / "config.json", num_key_value_heads=1, num_attention_heads=2, hidden_size=64,
                 head_dim=2, intermediate_size=178)
    with pytest.raises(ModelFormatError, match="multiple of 4"):
        Engine.load(model_copy)


def test_sharded_model_loads_and_missing_shard_is_named(model_factory, tmp_path):
    src = model_factory("odd-packed-bitlinear")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) == 2 and (dst / "model.safetensors.index.json").exists()
    assert len(load_weights(dst, ModelConfig.from_dir(dst)).layers) == 3
    shards[1].unlink()
    with pytest.raises(ModelFormatError, match=shards[1].name + ": file not found"):
        Engine.load(dst)


def test_no_weights_file(tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no model.safetensors or model.safetensors.index.json"):
        Engine.load(model_copy)


def test_bf16_online_weights_are_ternarized_like_transformers(model_factory):
    path = model_factory("odd-bf16-auto")
    cfg = ModelConfig.from_dir(path)
    w = load_weights(path, cfg)
    raw = bf16_to_f32(np.array(index_model(path)["model.layers.2.mlp.up_proj.weight"].load()))
    mean = np.abs(raw).mean(dtype=np.float64)
    expected = np.clip(np.round(raw / np.float32(mean)), -1, 1)
    assert np.array_equal(unpack_ternary(w.layers[2].up_proj.packed), expected)
    assert w.layers[2].up_proj.scale == pytest.approx(mean, rel=1e-6)
    t, scale = ternarize(np.zeros((4, 4), np.float32))  # all-zero weights: clamp keeps the scale finite
    assert not t.any() and scale == pytest.approx(1e-5)


def test_packed_weights_stay_packed_and_mapped(tiny_model):
    w = load_weights(tiny_model, ModelConfig.from_dir(tiny_model))
    q = w.layers[0].q_proj.packed
    assert q.dtype == np.uint8 and q.shape == (16, 64)
    assert isinstance(q, np.memmap) and not q.flags.writeable
    assert isinstance(w.embed, np.memmap) and w.embed.dtype == np.uint16


def test_hub_id_when_offline_says_how_to_pass_a_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFormatError, match="pass its local directory"):
        resolve_model_dir("microsoft/bitnet-b1.58-2B-4T")
    with pytest.raises(ModelFormatError, match="no such model directory"):
        resolve_model_dir("./not/a/model/dir")


def test_loading_does_not_unpickle_or_run_code(model_copy):
    (model_copy / "pytorch_model.bin").write_bytes(b"not a pickle")  # must be ignored, never read
    (model_copy / "modeling_evil.py").write_text("raise SystemExit('executed')")
    edit_json(model_copy / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    assert Engine.load(model_copy).config.vocab_size == 512

