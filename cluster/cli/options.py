"""Command-line options shared by the commands that load a model."""

from __future__ import annotations

import argparse

HEADS = ("bf16", "int8")
WEIGHTS_FORMATS = ("2bit", "1.6bit")  # ternpool.engine.native.WEIGHTS_FORMATS, without importing the engine


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", choices=HEADS, default="bf16",
                   help="output head: bf16 (exact, default) or int8 (half the bytes per token, approximate)")
    p.add_argument("--weights-format", choices=WEIGHTS_FORMATS, default=None,
                   help="ternary weights in memory: 2bit (fastest batched) or 1.6bit (5 weights a byte, 20%% "
                   "fewer bytes per token). A Hugging Face model is converted once into the cache "
                   "(TERNPOOL_CACHE_DIR, default ~/.cache/ternpool); a converted model keeps its own "
                   "format (default: 2bit)")
