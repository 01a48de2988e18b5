"""ternpool's native weight file: conversion, the cache, format checks, and exactness of both layouts."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from ternpool.engine import ModelConfig
from ternpool.engine.config import ModelFormatError
from ternpool.engine.model import BitNetModel
from ternpool.engine import native
from ternpool.engine.native import (MARKER, WEIGHTS_FILE, convert, ensure_native, load_native, native_info)
from ternpool.engine.weights import LINEARS, load_weights
from ternpool.kernels import unpack_ternary
from ternpool.kernels.base3 import unpack_base3

from helpers import same_stat_write

pytestmark = pytest.mark.unit

# the variants of tests/conftest.py's MODEL_VARIANTS (a name, as tests/cluster has its own conftest)
VARIANTS = ["tiny-packed-auto", "odd-packed-bitlinear", "odd-bf16-auto", "gqa2-bf16-auto"]


@pytest.fixture(scope="module")
def converted(model_factory, tmp_path_factory):
    """variant -> {weights format -> native dir}"""
    out = {}
    for name in VARIANTS:
        src = model_factory(name)
        base = tmp_path_factory.mktemp(f"native-{name}")
        out[name] = {fmt: convert(src, base / fmt, fmt) for fmt in ("2bit", "1.6bit")}
    return out


def _ternary(lin) -> np.ndarray:
    if lin.layout == "i2":
        return unpack_ternary(lin.packed)
    return unpack_base3(lin.packed, lin.in_features)


@pytest.mark.parametrize("name", VARIANTS)
def test_native_weights_equal_the_hugging_face_ones(name, model_factory, converted):
    src = model_factory(name)
    cfg = ModelConfig.from_dir(src)
    hf = load_weights(src, cfg)
    assert np.array_equal(np.asarray(hf.embed), np.asarray(load_native(converted[name]["2bit"], cfg).embed))
    for fmt, d in converted[name].items():
        w = load_native(d, cfg)
        assert w.weights_format == fmt
        assert np.array_equal(w.norm, hf.norm)
        for a, b in zip(hf.layers, w.layers):
            assert np.array_equal(a.ffn_sub_norm, b.ffn_sub_norm) and np.array_equal(a.input_norm, b.input_norm)
            for lin in LINEARS:
                x, y = getattr(a, lin), getattr(b, lin)
                assert (x.weight_scale, x.divides) == (y.weight_scale, y.divides), (fmt, lin)
                assert np.array_equal(_ternary(x), _ternary(y)), (fmt, lin)
        assert isinstance(w.layers[0].q_proj.packed, np.memmap)  # mapped, not copied


@pytest.mark.parametrize("name", VARIANTS)
def test_both_layouts_give_identical_logits(name, model_factory, converted):
    cfg = ModelConfig.from_dir(model_factory(name))
    rng = np.random.default_rng(1)
    n = 37
    tokens = rng.integers(0, cfg.vocab_size, size=n)
    pos, slots = np.arange(n), np.zeros(n, np.int64)
    logits = {}
    for fmt, d in converted[name].items():
        for head in ("bf16", "int8"):
            m = BitNetModel(load_native(d, cfg), slots=1, max_context=64, head=head)
            logits[fmt, head] = m.forward(tokens, pos, slots)
    for head in ("bf16", "int8"):
        assert np.array_equal(logits["2bit", head], logits["1.6bit", head])


def test_int8_head_from_the_file_equals_the_one_made_at_load(model_factory, converted):
    src = model_factory("tiny-packed-auto")
    cfg = ModelConfig.from_dir(src)
    from ternpool.kernels.head8 import quantize_head

    w = load_native(converted["tiny-packed-auto"]["2bit"], cfg)
    q, s = quantize_head(load_weights(src, cfg).embed)
    assert np.array_equal(w.head_q, q) and np.array_equal(w.head_scale, s)


def test_streaming_in_small_row_blocks_writes_the_same_file(model_factory, tmp_path, monkeypatch, converted):
    for name in ("odd-bf16-auto", "odd-packed-bitlinear"):
        src = model_factory(name)
        monkeypatch.setattr(native, "_ROWS", 8)  # many blocks per tensor, stripes of 2 packed rows
        for fmt in ("2bit", "1.6bit"):
            out = convert(src, tmp_path / f"{name}-{fmt}", fmt)
            assert (out / WEIGHTS_FILE).read_bytes() == (converted[name][fmt] / WEIGHTS_FILE).read_bytes()


def test_convert_refuses_existing_output_and_native_input(model_factory, converted, tmp_path):
    src = model_factory("tiny-packed-auto")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(src, converted["tiny-packed-auto"]["2bit"])
    with pytest.raises(ModelFormatError, match="already a ternpool native model"):
        convert(converted["tiny-packed-auto"]["2bit"], tmp_path / "again")
    with pytest.raises(ValueError, match="weights format must be one of"):
        convert(src, tmp_path / "x", "3bit")
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


def test_version_and_metadata_are_checked(converted, model_factory, tmp_path):
    import shutil

    cfg = ModelConfig.from_dir(model_factory("tiny-packed-auto"))
    d = tmp_path / "copy"
    shutil.copytree(converted["tiny-packed-auto"]["2bit"], d)
    info = json.loads((d / MARKER).read_text())
    (d / MARKER).write_text(json.dumps(dict(info, format_version=99)))
    with pytest.raises(ModelFormatError, match=r"ternpool.json: format .* version 99.*convert the model again"):
        load_native(d, cfg)
    (d / MARKER).write_text(json.dumps(dict(info, weights_format="1.6bit")))  # marker and file disagree
    with pytest.raises(ModelFormatError, match="does not match ternpool.json"):
        load_native(d, cfg)
    (d / MARKER).write_text(json.dumps(info))
    other = ModelConfig.from_dir(model_factory("odd-packed-bitlinear"))
    with pytest.raises(ModelFormatError, match=f"{WEIGHTS_FILE}: .*expected .* for this config.json"):
        load_native(d, other)
    assert native_info(d)["weights_format"] == "2bit"
    with pytest.raises(ModelFormatError, match="native model in 2bit format, not 1.6bit"):
        ensure_native(d, "1.6bit")


def _ensure(args):
    src, cache, fmt = args
    return str(ensure_native(src, fmt, cache))


def test_cache_converts_once_even_with_concurrent_loaders(model_factory, tmp_path):
    src = model_factory("odd-bf16-auto")
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        dirs = pool.map(_ensure, [(src, str(cache), "1.6bit")] * 3)
    assert len(set(dirs)) == 1 and Path(dirs[0]).parent == cache
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == [".locks", Path(dirs[0]).name]  # no partial directories left
    mtime = (Path(dirs[0]) / WEIGHTS_FILE).stat().st_mtime_ns
    assert ensure_native(src, "1.6bit", cache) == Path(dirs[0])  # found, not converted again
    assert (Path(dirs[0]) / WEIGHTS_FILE).stat().st_mtime_ns == mtime
    two = ensure_native(src, "2bit", cache)
    assert two != Path(dirs[0]) and native_info(two)["weights_format"] == "2bit"


def test_cache_key_follows_the_weights_content(model_factory, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(model_factory("tiny-packed-auto"), src)
    first = ensure_native(src, None, tmp_path / "cache")
    # the last layers' weights of another model of the same shape: same size, same header and first
    # 64 KB, same mtime
    mine = (src / "model.safetensors").read_bytes()
    other = (Path(model_factory("tiny-packed-auto", seed=1)) / "model.safetensors").read_bytes()
    assert len(mine) > 80_000 and mine[80_000:] != other[80_000:]
    same_stat_write(src / "model.safetensors", mine[:80_000] + other[80_000:])
    second = ensure_native(src, None, tmp_path / "cache")
    assert second != first
    assert (second / WEIGHTS_FILE).read_bytes() != (first / WEIGHTS_FILE).read_bytes()


def test_cache_key_follows_the_tokenizer_and_chat_template(model_factory, tmp_path):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(model_factory("tiny-packed-auto"), src)
    first = ensure_native(src, None, tmp_path / "cache")
    tok = src / "tokenizer.json"
    same_stat_write(tok, tok.read_bytes().replace(b'"<|begin_of_text|>"', b'"<|begin_of_texT|>"'))
    second = ensure_native(src, None, tmp_path / "cache")
    assert second != first
    assert (second / "tokenizer.json").read_bytes() == tok.read_bytes()  # never the stale copy
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    third = ensure_native(src, None, tmp_path / "cache")
    assert third not in (first, second)
    assert json.loads((third / "tokenizer_config.json").read_text())["chat_template"] == config["chat_template"]


def test_convert_command(model_factory, tmp_path, capsys):
    from ternpool.cluster.cli import main

    out = tmp_path / "native"
    assert main(["convert", model_factory("tiny-packed-auto"), "--out", str(out), "--weights-format", "1.6bit",
                 "--quiet"]) == 0
    assert "1.6bit" in capsys.readouterr().out and native_info(out)["weights_format"] == "1.6bit"
    assert main(["convert", model_factory("tiny-packed-auto"), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_two_workers_share_one_copy_of_the_weights(model_factory):
    from ternpool.engine.bench import memory_sharing

    r = memory_sharing(model_factory("odd-packed-bitlinear"), workers=2, head="int8")
    assert all(w["file_rss"] > 0 for w in r["per_worker"])  # both really read the mapped file
    assert r["weights_pss"] <= 0.6 * r["weights_rss"]  # ... and PSS counts those pages about once
