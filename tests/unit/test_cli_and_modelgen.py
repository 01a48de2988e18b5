"""`ternpool make-model` and `ternpool generate` as users run them."""

from __future__ import annotations

import json
import subprocess

import pytest

from ternpool.cluster.cli import main
from ternpool.engine import ModelConfig
from ternpool.engine.modelgen import SHAPES, make_model
from ternpool.engine.safetensors_io import index_model
from ternpool.engine.tokenizer import Tokenizer

from helpers import CLI

pytestmark = pytest.mark.unit


def test_make_model_is_deterministic_and_seeded(tmp_path):
    a, b, c = (make_model(tmp_path / n, "tiny", seed=s) for n, s in [("a", 1), ("b", 1), ("c", 2)])
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_make_model_writes_the_hf_layout(tmp_path):
    out = make_model(tmp_path / "m", "tiny", layers=3, vocab=600, shards=3, fmt="bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BitNetForCausalLM"] and cfg["model_type"] == "bitnet"
    assert cfg["quantization_config"] == {"linear_class": "autobitlinear", "quant_method": "bitnet",
                                          "quantization_mode": "online"}
    assert cfg["num_hidden_layers"] == 3 and cfg["vocab_size"] == 600
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [cfg["eos_token_id"], cfg["eos_token_id"] + 8]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    tensors = index_model(out)
    assert tensors["model.layers.2.mlp.down_proj.weight"].dtype == "BF16"
    assert tensors["model.layers.2.mlp.down_proj.weight"].shape == (64, 176)
    assert "lm_head.weight" not in tensors
    assert len(Tokenizer(out)) == 600


def test_2b4t_shape_matches_the_real_config():
    s = SHAPES["2b4t"]
    assert (s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads,
            s.num_key_value_heads, s.vocab_size, s.head_dim) == (2560, 6912, 30, 20, 5, 128256, 128)
    assert (SHAPES["100b"].hidden_size, SHAPES["100b"].intermediate_size, SHAPES["100b"].num_hidden_layers) \
        == (8192, 45568, 72)


def test_llama3_tokenizer_model_uses_real_special_ids(tmp_path):
    pytest.importorskip("llama_models")
    out = make_model(tmp_path / "l3", "tiny", vocab=128256, layers=1)
    cfg = ModelConfig.from_dir(out)
    assert cfg.bos_token_id == 128000 and cfg.eos_token_ids == (128001, 128009)
    tok = Tokenizer(out)
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 128000 and ids.count(128000) == 1 and ids[-1] == 220 and 128009 in ids


def test_random_text_does_not_collapse_into_one_token(tiny_engine):
    from ternpool.engine import Request, SamplingParams

    # A random model can fall into a short cycle on some prompt (greedy decoding); most prompts must not.
    prompts = ["Once upon a time", "Hello", "The quick brown fox"]
    res = tiny_engine.generate([Request(i, prompt=p, params=SamplingParams(max_tokens=64))
                                for i, p in enumerate(prompts)])
    distinct = [len(set(r.token_ids)) for r in res]
    assert sum(d >= 8 for d in distinct) >= 2, distinct


def test_cli_make_model_and_generate_json(tmp_path, capsys):
    assert main(["make-model", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "6",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"prompt_ids", "output_ids", "text", "finish_reason"}
    assert len(out["output_ids"]) == 6 and out["finish_reason"] == "length"
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--chat", "--system", "Be",
                 "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "1", "--max-tokens", "4",
                 "--json"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert len(chat["prompt_ids"]) > len(out["prompt_ids"])
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "6",
                 "--json", "--logprobs", "3"]) == 0
    lp = json.loads(capsys.readouterr().out)
    assert lp["output_ids"] == out["output_ids"] and "prompt_logprobs" not in lp
    assert [t["token_id"] for t in lp["logprobs"]] == lp["output_ids"]
    assert all(len(t["top_logprobs"]) == 3 and t["top_logprobs"][0]["token_id"] == t["token_id"]  # greedy
               and t["logprob"] <= 0 for t in lp["logprobs"])
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "0",
                 "--json", "--prompt-logprobs", "1"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["output_ids"] == [] and [t["token_id"] for t in scored["prompt_logprobs"]] == out["prompt_ids"]
    assert scored["prompt_logprobs"][0]["logprob"] is None and "logprobs" not in scored
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--logprobs", "21"]) == 2
    assert "top_logprobs must be an integer in 0..20" in capsys.readouterr().err


def test_cli_errors_are_short_and_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature must be" in capsys.readouterr().err
    assert main(["make-model", "--out", str(tmp_path / "x"), "--format", "bf16",
                 "--linear-class", "bitlinear"]) == 2
    assert "only with linear_class autobitlinear" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([*CLI, "generate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--max-tokens" in out and "--json" in out
    flat = " ".join(out.split())  # argparse wraps the help text
    assert "--kv-cache {f32,bf16,int8}" in flat and "int8 (about a quarter of f32's memory" in flat


def test_submit_object_store_option_reaches_the_pool_config():
    from ternpool.cluster.cli import build_parser
    from ternpool.cluster.cli.jobs import _pool

    args = build_parser().parse_args(["submit", "in.parquet", "--model", "m", "--output", "o", "--object-store-mb", "96"])
    assert _pool(args).object_store_memory == 96 * 1024 ** 2
    args = build_parser().parse_args(["submit", "in.parquet", "--model", "m", "--output", "o"])
    assert _pool(args).object_store_memory is None
