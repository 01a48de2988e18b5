"""Issue 12, part C: every bad model, config or row fails cleanly, with a message naming the file and
tensor, key or row; no bad model starts a worker, no bad row kills one."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ternpool.engine import Engine, ModelConfig, ModelFormatError, Request, SamplingParams
from ternpool.engine.safetensors_io import index_model
from ternpool.engine.validate import validate_model
from ternpool.jobs import JobSpec, open_inputs
from ternpool.jobs.rows import read_shard, to_requests

from helpers import CLI, RAISING_TEMPLATE, edit_json, rewrite_safetensors

pytestmark = pytest.mark.unit

def _edit_header(path, edit):
    """Change the JSON header of model.safetensors in place (data bytes kept)."""
    file = path / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n, "the edited header must not grow"
    file.write_bytes(raw[:8] + new + raw[8 + n:])


def _hidden(path) -> int:
    return json.loads((path / "config.json").read_text())["hidden_size"]


# -- 2. a bad model fails prepare() before any worker (and before Ray) -------------------------------

def _missing(p):
    rewrite_safetensors(p, drop=["model.norm.weight"])


def _wrong_shape(p):
    rewrite_safetensors(p, replace={"model.norm.weight": ("F32", np.ones(_hidden(p) + 2, np.float32))})


def _wrong_dtype(p):
    rewrite_safetensors(p, replace={"model.layers.0.mlp.up_proj.weight_scale": ("I32", np.ones(1, np.int32))})


def _offset_past_end(p):
    size = (p / "model.safetensors").stat().st_size

    def edit(h):
        start, end = h["model.norm.weight"]["data_offsets"]
        h["model.norm.weight"]["data_offsets"] = [size, size + end - start]
    _edit_header(p, edit)


def _overlap(p):
    def edit(h):
        h["model.layers.0.input_layernorm.weight"]["data_offsets"] = list(
            h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"])
    _edit_header(p, edit)


def _truncated(p):
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])


def _trailing_bytes(p):
    with open(p / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)


def _broken_tokenizer(p):
    (p / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _template_does_not_render(p):
    edit_json(p / "tokenizer_config.json", chat_template="{{ messages[0]['content'] | no_such_filter }}")


@pytest.mark.parametrize("breakage, match", [
    (_missing, r"model\.safetensors: missing tensor\(s\) \['model\.norm\.weight'\]"),
    (_wrong_shape, r"model\.safetensors: tensor model\.norm\.weight is F32\[\d+\], expected BF16/F32/F16\[\d+\]"),
    (_wrong_dtype, r"model\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight_scale is I32\[1\], expected"),
    (_offset_past_end, r"model\.safetensors: tensor 'model\.norm\.weight' ends at byte \d+ but the file has"),
    (_overlap, r"model\.safetensors: tensors 'model\.layers\.0\.\w+\.weight' and "
               r"'model\.layers\.0\.\w+\.weight' overlap"),
    (_truncated, r"model\.safetensors: tensor '[\w.]+' ends at byte \d+ but the file has \d+ bytes \(truncated"),
    (_trailing_bytes, r"model\.safetensors: the file has \d+ bytes but its tensors end at byte \d+"),
    (_broken_tokenizer, r"tokenizer\.json: not valid JSON"),
    (_template_does_not_render, r"model: the chat template does not render .*no_such_filter"),
])
def test_a_broken_model_fails_prepare_naming_the_file_and_tensor_and_starts_no_ray(model_copy, tmp_path,
                                                                                   breakage, match):
    import ray

    from ternpool.cluster.driver import prepare

    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), src)
    breakage(model_copy)
    with pytest.raises(ModelFormatError, match=match):
        prepare(JobSpec(str(src), str(tmp_path / "out"), str(model_copy)))
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()  # refused before OUT is touched


def test_validate_model_accepts_hf_and_native_directories(tiny_model, tmp_path):
    from ternpool.engine.native import WEIGHTS_FILE, convert

    assert validate_model(tiny_model) == ModelConfig.from_dir(tiny_model)
    native = convert(tiny_model, tmp_path / "native")
    assert validate_model(native) == ModelConfig.from_dir(tiny_model)
    f = native / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ModelFormatError, match=r"weights\.ternpool\.safetensors: tensor '[\w.]+' ends at byte"):
        validate_model(native)


# -- 3. any exception in one row is that row's error -------------------------------------------------

@pytest.fixture
def raising_template_model(model_copy):
    edit_json(model_copy / "tokenizer_config.json", chat_template=RAISING_TEMPLATE)
    return model_copy


def test_a_chat_template_that_raises_fails_only_that_request(tiny_engine, raising_template_model):
    # tiny_engine converted the same weights into the cache already: the changed chat template must not
    # be served from that conversion (the cache key covers the tokenizer files)
    engine = Engine.load(raising_template_model, slots=2, max_context=128)
    p = SamplingParams(max_tokens=3)
    results = engine.generate([
        Request("tool", messages=[{"role": "tool", "content": "42"}], params=p),
        Request("user", messages=[{"role": "user", "content": "hello"}], params=p),
        Request("plain", prompt="hello", params=p),
    ])
    assert results[0].finish_reason == "error"
    assert results[0].error == "TemplateError: unknown role: tool"
    assert [r.error for r in results[1:]] == [None, None]
    assert all(r.completion_tokens == 3 for r in results[1:])


def test_non_finite_logits_fail_only_that_sequence(tiny_engine, monkeypatch):
    real = tiny_engine.model.logits  # the output head, on the rows that sample
    calls = {"n": 0}

    def head(*args, **kwargs):
        logits = np.array(real(*args, **kwargs))
        calls["n"] += 1
        if calls["n"] == 2:  # the second step: the first sequence's row goes NaN
            logits[0] = np.nan
        return logits

    monkeypatch.setattr(tiny_engine.model, "logits", head)
    p = SamplingParams(max_tokens=4)
    a, b = tiny_engine.generate([Request("a", prompt="river", params=p), Request("b", prompt="mill", params=p)])
    assert (a.finish_reason, a.completion_tokens) == ("error", 1)
    assert a.error.startswith("ValueError: the model produced non-finite logits")
    assert b.error is None and b.completion_tokens == 4


def test_a_row_that_raises_while_converting_becomes_that_rows_error(tmp_path, monkeypatch):
    from ternpool.jobs import plan_shards
    from ternpool.jobs import rows as rows_mod

    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), src)
    spec = JobSpec(str(src), str(tmp_path / "out"), "m")
    inputs = open_inputs(spec.inputs)
    table = read_shard(inputs, plan_shards(inputs, 10)[0])
    real = rows_mod._text_of

    def text_of(row_index, column, value):
        if value == "b":
            raise TypeError("unhashable type: 'list'")
        return real(row_index, column, value)

    monkeypatch.setattr(rows_mod, "_text_of", text_of)
    out = to_requests(table, spec, "prompt")
    assert [r.error for r in out] == [None, "row 1: TypeError: unhashable type: 'list'", None]
    assert out[0].request.prompt == "a" and out[2].request.prompt == "c"


# -- 4. bad configs: one line naming the field and the range -----------------------------------------

def _cfg(tiny_model, **changes) -> dict:
    with open(os.path.join(tiny_model, "config.json")) as f:
        cfg = json.load(f)
    if "head_dim" not in changes:
        cfg.pop("head_dim", None)  # derived from hidden_size / num_attention_heads
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("change, match", [
    ({"num_attention_heads": 0}, r"num_attention_heads must be an integer >= 1, found 0"),
    ({"num_key_value_heads": -2}, r"num_key_value_heads must be an integer >= 1, found -2"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers must be an integer >= 1, found 0"),
    ({"hidden_size": -64}, r"hidden_size must be an integer >= 1, found -64"),
    ({"intermediate_size": 0}, r"intermediate_size must be an integer >= 1, found 0"),
    ({"vocab_size": 0}, r"vocab_size must be an integer >= 1, found 0"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings must be an integer >= 1, found 0"),
    ({"head_dim": 0}, r"head_dim must be an integer >= 1, found 0"),
    ({"num_attention_heads": 5}, r"hidden_size \(64\) must be a multiple of num_attention_heads \(5\) when "
                                 r"head_dim is not given"),
    ({"num_hidden_layers": True}, r"num_hidden_layers must be an integer >= 1, found True"),
    ({"hidden_size": 64.0}, r"hidden_size must be an integer >= 1, found 64\.0"),
    ({"rope_theta": float("inf")}, r"rope_theta must be a finite number > 0, found inf"),
    ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a finite number > 0, found nan"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps must be a finite number > 0, found 0"),
    ({"rope_theta": "big"}, r"rope_theta must be a finite number > 0, found 'big'"),
    ({"architectures": 5}, r"expected model_type 'bitnet' and architectures \['BitNetForCausalLM'\], found"),
    ({"eos_token_id": [1, "x"]}, r"eos_token_id must be an integer >= 0 or a list of them, found 'x'"),
])
def test_bad_config_values_name_the_field_and_range(tiny_model, change, match):
    cfg = _cfg(tiny_model, **change)
    with pytest.raises(ModelFormatError, match=r"^config\.json: " + match):
        ModelConfig.from_dict(cfg)


def test_a_model_too_large_for_this_machine_is_refused_before_anything_is_mapped(model_copy, monkeypatch):
    from ternpool.engine import engine as engine_mod

    edit_json(model_copy / "config.json", vocab_size=2_000_000_000)  # a 256 GB output head
    monkeypatch.setattr(engine_mod, "ensure_native", lambda *a, **k: pytest.fail("converted or mapped"))
    with pytest.raises(ModelFormatError, match=r"model: does not fit this machine's available memory: one worker "
                                               r"needs [\d.]+ GB"):
        Engine.load(model_copy, slots=1, max_context=64)


def test_weight_map_must_be_an_object_of_strings(model_copy):
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(ModelFormatError, match=r"index\.json: 'weight_map' must be an object of tensor name -> file"):
        index_model(model_copy)
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 3}}))
    with pytest.raises(ModelFormatError, match=r"'weight_map' must be an object"):
        index_model(model_copy)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_deeply_nested_json_in_any_model_file_is_a_clean_error(model_copy, name):
    (model_copy / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFormatError, match=rf"{name}: JSON nested too deeply"):
        validate_model(model_copy)


def test_the_cli_prints_one_line_for_a_bad_config(model_copy):
    good = json.loads((model_copy / "config.json").read_text())
    for text, expect in [("[" * 100_000 + "]" * 100_000, "config.json: JSON nested too deeply"),
                         (json.dumps(dict(good, num_attention_heads=0)),
                          "config.json: num_attention_heads must be an integer >= 1, found 0")]:
        (model_copy / "config.json").write_text(text)
        r = subprocess.run([*CLI, "generate", "--model", str(model_copy),
                            "--prompt", "hi"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"ternpool generate: error: {model_copy}"), r.stderr
        assert expect in lines[0]


# -- 5. files a model refers to stay inside it -------------------------------------------------------

@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_weight_map_entries_outside_the_model_are_refused(model_copy, shard):
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(ModelFormatError, match=r"shard in model\.safetensors\.index\.json '.*' must be a relative "
                                               r"file name inside the model directory"):
        index_model(model_copy)


@pytest.mark.parametrize("entry", ["model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_symlinks_out_of_the_model_directory_are_refused(model_copy, tmp_path, entry):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(model_copy / entry, outside / entry)
    os.symlink(outside / entry, model_copy / entry)
    with pytest.raises(ModelFormatError, match=rf"{entry}: entry '{entry}' is a link to a file outside the model "
                                               "directory"):
        validate_model(model_copy)
    with pytest.raises(ModelFormatError, match=r"is a link to a file outside"):
        Engine.load(model_copy, slots=1, max_context=64)
    from ternpool.engine.native import convert

    with pytest.raises(ModelFormatError, match=r"is a link to a file outside"):
        convert(model_copy, tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_symlinks_inside_the_model_directory_are_fine(model_copy):
    shutil.move(model_copy / "tokenizer.json", model_copy / "real-tokenizer.json")
    os.symlink("real-tokenizer.json", model_copy / "tokenizer.json")
    assert validate_model(model_copy).vocab_size > 0


def test_a_tokenizer_config_pointing_at_a_file_by_path_is_refused(model_copy):
    edit_json(model_copy / "tokenizer_config.json", tokenizer_file="/etc/passwd")
    with pytest.raises(ModelFormatError, match=r"tokenizer_config\.json: tokenizer_file = '/etc/passwd' points"):
        validate_model(model_copy)


def test_a_non_model_file_is_never_quoted_in_errors(model_copy):
    secret = b"root:x:0:0:SECRET-PASSWORD-LINE:/root:/bin/bash\n" * 50
    (model_copy / "model.safetensors").write_bytes(secret)
    with pytest.raises(ModelFormatError) as e:
        validate_model(model_copy)
    assert "SECRET" not in str(e.value) and "root:x" not in str(e.value)
    assert str(struct.unpack("<Q", secret[:8])[0]) not in str(e.value)
    body = b'{"x": "SECRET-PASSWORD-LINE" oops'
    (model_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelFormatError, match=r"safetensors header of .*model\.safetensors: not valid JSON") as e:
        validate_model(model_copy)
    assert "SECRET" not in str(e.value)
    body = b'{"t": {"dtype": "F32", "shape": "SECRET-PASSWORD-LINE", "data_offsets": [0, 4]}}'
    (model_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    with pytest.raises(ModelFormatError, match=r"tensor 't': shape must be a list of integers") as e:
        validate_model(model_copy)
    assert "SECRET" not in str(e.value)
