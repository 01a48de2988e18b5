"""One `EngineConfig` from the command line through `PoolConfig` to `Engine.load`; the sampling flags
of both commands; the sizes derived from a model's shape, the same for a config and a modelgen shape."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ternpool.cluster.cli import build_parser
from ternpool.cluster.cli.options import engine_config, sampling_params
from ternpool.engine import Engine, EngineConfig, ModelConfig, SamplingParams
from ternpool.engine.shapes import LINEARS, kv_bytes_per_slot, linear_shapes, packed_shape
from ternpool.jobs import JobSpec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("option, value", [("threads", 0), ("slots", -1), ("max_context", 1.5), ("step_tokens", None),
                                           ("slots", True), ("truncate", "middle"), ("head", "fp8"),
                                           ("weights_format", "3bit"), ("cache_dir", ""),
                                           ("kv_cache", "fp8"), ("kv_cache", None)])
def test_a_bad_engine_option_is_named(option, value):
    with pytest.raises(ValueError, match=rf"^EngineConfig\.{option} must be .*, got {value!r}$"):
        EngineConfig(**{option: value})


def test_engine_config_defaults_and_paths():
    c = EngineConfig(cache_dir=Path("some") / "cache")
    assert c.cache_dir == str(Path("some") / "cache")
    assert (c.threads, c.slots, c.max_context, c.step_tokens, c.truncate, c.head, c.weights_format, c.kv_cache) == \
        (None, None, None, 512, "error", "int8", None, "f32")


def test_the_cli_builds_one_engine_config_for_a_pool_and_for_generate():
    from ternpool.cluster.cli.jobs import _pool

    args = build_parser().parse_args(["submit", "in.parquet", "--model", "m", "--output", "o", "--threads-per-worker",
                                      "2", "--slots", "3", "--max-context", "64", "--head", "int8",
                                      "--weights-format", "1.6bit", "--truncate", "left", "--kv-cache", "bf16"])
    assert _pool(args).engine == EngineConfig(threads=2, slots=3, max_context=64, truncate="left", head="int8",
                                              weights_format="1.6bit", kv_cache="bf16")
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--threads", "1",
                                      "--max-context", "32"])
    assert engine_config(args, slots=1) == EngineConfig(threads=1, slots=1, max_context=32)
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--kv-cache", "bf16"])
    assert engine_config(args, slots=1) == EngineConfig(slots=1, kv_cache="bf16")
    args = build_parser().parse_args(["bench", "model", "--model", "m", "--kv-cache", "bf16"])
    assert args.kv_cache == "bf16"
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--kv-cache", "int8"])
    assert engine_config(args, slots=1) == EngineConfig(slots=1, kv_cache="int8")
    assert build_parser().parse_args(["bench", "model", "--model", "m", "--kv-cache", "int8"]).kv_cache == "int8"
    bad = build_parser().parse_args(["submit", "in.parquet", "--model", "m", "--output", "o", "--slots", "0"])
    with pytest.raises(ValueError, match="EngineConfig.slots must be an integer >= 1"):
        _pool(bad)


def test_both_commands_have_the_same_sampling_flags():
    parser = build_parser()
    flags = ["--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "3", "--seed", "4",
             "--stop", "a", "--stop", "b", "--logprobs", "2", "--logprobs-mode", "processed"]
    gen = parser.parse_args(["generate", "--model", "m", "--prompt", "p", *flags])
    job = parser.parse_args(["submit", "in.parquet", "--model", "m", "--output", "o", *flags])
    expected = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=4, stop=("a", "b"),
                              top_logprobs=2, logprobs_mode="processed")
    assert sampling_params(gen) == sampling_params(job) == expected
    # the defaults: SamplingParams' own, but a job always has a seed (0)
    gen = parser.parse_args(["generate", "--model", "m", "--prompt", "p"])
    job = parser.parse_args(["submit", "in.parquet", "--model", "m", "--output", "o"])
    assert sampling_params(gen) == SamplingParams()
    assert sampling_params(job) == SamplingParams(seed=0)


def test_the_workers_engine_takes_the_jobs_truncate():
    from ternpool.cluster.driver import worker_engine

    left = JobSpec("in", "out", "m", truncate="left")
    assert worker_engine(left, EngineConfig(slots=2)) == EngineConfig(slots=2, truncate="left")
    assert worker_engine(left, EngineConfig(truncate="left")).truncate == "left"
    with pytest.raises(ValueError, match="truncate is a job option"):
        worker_engine(JobSpec("in", "out", "m"), EngineConfig(truncate="left"))


def test_engine_load_reads_the_config_and_keywords_replace_its_fields(tiny_model):
    config = EngineConfig(threads=1, slots=2, max_context=64, step_tokens=16, truncate="left", head="int8",
                          kv_cache="bf16")
    e = Engine.load(tiny_model, config)
    assert (e.threads, e.model.slots, e.model.max_context, e.step_tokens, e.truncate, e.model.head,
            e.model.kv_cache, e.model.k_cache.dtype) == (1, 2, 64, 16, "left", "int8", "bf16", np.uint16)
    e = Engine.load(tiny_model, config, slots=1, head="bf16", kv_cache="f32")
    assert (e.model.slots, e.model.max_context, e.model.head, e.model.kv_cache, e.model.k_cache.dtype) == \
        (1, 64, "bf16", "f32", np.float32)
    with pytest.raises(ValueError, match="EngineConfig.slots"):
        Engine.load(tiny_model, config, slots=0)


def test_sizes_are_the_same_for_a_config_and_a_modelgen_shape():
    from ternpool.engine.modelgen import SHAPES, _config

    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    for shape in SHAPES.values():
        cfg = ModelConfig.from_dict(_config(shape, "packed", "autobitlinear", tok))
        assert linear_shapes(shape) == linear_shapes(cfg) and tuple(linear_shapes(cfg)) == LINEARS
        assert kv_bytes_per_slot(shape, 100) == kv_bytes_per_slot(cfg, 100) > 0
    cfg = ModelConfig.from_dict(_config(SHAPES["2b4t"], "packed", "autobitlinear", tok))
    assert linear_shapes(cfg)["down_proj"] == (2560, 6912)
    assert packed_shape("2bit", 2560, 6912) == (640, 6912)
    assert packed_shape("1.6bit", 2560, 6912) == (2560, 32 * 44)  # 6912 columns: 44 blocks of 160
    assert kv_bytes_per_slot(cfg, 4096) == 2 * 30 * 5 * 128 * 4 * 4096 == 2 * kv_bytes_per_slot(cfg, 4096, "bf16")
    assert kv_bytes_per_slot(cfg, 4096, "int8") == 2 * 30 * 5 * (128 + 4) * 4096  # values and a float32 scale a row
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        kv_bytes_per_slot(cfg, 4096, "int4")
    with pytest.raises(ValueError, match="weights format must be one of"):
        packed_shape("3bit", 4, 4)
