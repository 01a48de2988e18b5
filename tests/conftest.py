"""Shared fixtures: random models are made once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the transformers oracle uses @torch.compile helpers
# compiled kernels stay in the user's cache (keyed by source, version and CPU) across test sessions;
# pinned before TERNPOOL_CACHE_DIR changes below, for this process and the workers it starts
from ternpool.kernels.config import kernel_cache_dir  # noqa: E402

os.environ.setdefault("NUMBA_CACHE_DIR", str(kernel_cache_dir()))
# models converted to the native format go to a cache of this test session, not the user's
os.environ["TERNPOOL_CACHE_DIR"] = tempfile.mkdtemp(prefix="ternpool-test-cache-")

from ternpool.engine.modelgen import Shape, make_model  # noqa: E402

# name -> (shape, format, linear_class, shards); parity runs on each of them.
MODEL_VARIANTS = {
    "tiny-packed-auto": ("tiny", "packed", "autobitlinear", 1),
    # sizes not multiples of 32, 5 query heads per kv head, head_dim 12, two shards
    "odd-packed-bitlinear": (Shape(60, 100, 3, 5, 1, 384, 1024), "packed", "bitlinear", 2),
    "odd-bf16-auto": (Shape(60, 100, 3, 5, 1, 384, 1024), "bf16", "autobitlinear", 1),
    # 2 query heads per kv head, odd intermediate multiple of 4
    "gqa2-bf16-auto": (Shape(72, 212, 2, 6, 3, 320, 1024), "bf16", "autobitlinear", 1),
}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    made: dict[str, str] = {}

    def get(name: str, seed: int = 0) -> str:
        key = f"{name}-s{seed}"
        if key not in made:
            shape, fmt, linear_class, shards = MODEL_VARIANTS[name]
            out = tmp_path_factory.mktemp(key)
            make_model(out, shape, seed=seed, fmt=fmt, linear_class=linear_class, shards=shards)
            made[key] = str(out)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> str:
    return model_factory("tiny-packed-auto")


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """A copy of the tiny model that a test may edit."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_engine(tiny_model):
    from ternpool.engine import Engine

    return Engine.load(tiny_model, slots=4, max_context=512)
