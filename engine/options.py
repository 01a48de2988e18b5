"""`EngineConfig`: every option of an engine in one frozen dataclass, and the names they take.

The command line builds one (`cluster/cli/options.py`), `PoolConfig.engine` carries it to every
worker, and `Engine.load(model, config)` reads it: an option is a field here and a flag there,
nowhere else. Light on purpose (no NumPy, no kernels), so that the command line can import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

HEADS = ("bf16", "int8")  # output head: the exact bf16 embedding, or its per-row int8 copy
DEFAULT_HEAD = "int8"  # faster decode at top-1 agreement within float32's own noise (README, "The output head")
KV_CACHES = ("f32", "bf16", "int8")  # the K and V caches: float32 (exact), bf16 (half the bytes: twice the slots),
# or int8 with a scale per token and KV head (a quarter of the bytes plus the scales: ~4x the slots)
WEIGHTS_FORMATS = ("2bit", "1.6bit")  # ternary weights in memory: Hugging Face packing, or base 3
DEFAULT_WEIGHTS_FORMAT = "2bit"
TRUNCATE_MODES = ("error", "left")  # a prompt longer than the context: an error, or keep its end
DEFAULT_SLOTS = 32  # where aggregate decode flattens on 2b4t (README, "Slots per worker"); fewer if memory is short
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_STEP_TOKENS = 512
KV_BLOCK_TOKENS = 16  # positions in one block of the paged KV cache: the unit a shared prompt prefix is reused in


@dataclass(frozen=True)
class EngineConfig:
    """How one engine (one process, or one worker of a pool) runs a model.

    threads: Numba threads; None: all CPUs of this machine (a pool's worker: all its node gives it).
    slots: sequences decoded at once; None: DEFAULT_SLOTS, fewer when their full KV cache would
        take more than half of the available memory.
    max_context: tokens per slot; None: DEFAULT_MAX_CONTEXT capped at the model's limit. Larger
        than the model's max_position_embeddings is an error.
    step_tokens: tokens fed through one forward pass at most (prefill chunks share it).
    truncate: "error" fails a prompt that does not fit the context; "left" keeps its end.
    head: "int8" (the default: the embedding quantized per row, half the head's bytes per decode step,
        logits within ~1% of the logit spread) or "bf16" (exact: what transformers computes).
    weights_format: "2bit" or "1.6bit"; None: 2bit, or a converted model's own.
    kv_cache: "f32" (exact: what transformers computes), "bf16" (K and V rounded to bf16 as they
        are stored: half the KV bytes per slot and per attention read; greedy tokens mostly the same)
        or "int8" (K and V quantized per token and KV head, absmax with a float32 scale: about a quarter
        of the bytes; greedy tokens mostly the same, a little less often than bf16's).
    cache_dir: where a Hugging Face model is converted once into ternpool's native file
        (default: TERNPOOL_CACHE_DIR, else ~/.cache/ternpool).
    prefix_cache: keep the KV blocks of prompts after their sequences end and reuse them for a later
        prompt that starts with the same tokens (whole blocks of KV_BLOCK_TOKENS), which then prefills
        only the rest; the blocks come out of the same slots x max_context budget. Results are bit for
        bit the same either way. False: every prompt is computed whole.
    """

    threads: int | None = None
    slots: int | None = None
    max_context: int | None = None
    step_tokens: int = DEFAULT_STEP_TOKENS
    truncate: str = "error"
    head: str = DEFAULT_HEAD
    weights_format: str | None = None
    kv_cache: str = "f32"
    cache_dir: str | None = None
    prefix_cache: bool = True

    def __post_init__(self):
        for name in ("threads", "slots", "max_context", "step_tokens"):
            value = getattr(self, name)
            optional = name != "step_tokens"
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1{' or None' if optional else ''}, "
                                 f"got {value!r}")
        for name, allowed, optional in (("truncate", TRUNCATE_MODES, False), ("head", HEADS, False),
                                        ("kv_cache", KV_CACHES, False),
                                        ("weights_format", WEIGHTS_FORMATS, True)):
            value = getattr(self, name)
            if value not in allowed and not (optional and value is None):
                raise ValueError(f"EngineConfig.{name} must be one of {allowed}{' or None' if optional else ''}, "
                                 f"got {value!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"EngineConfig.prefix_cache must be true or false, got {self.prefix_cache!r}")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
                raise ValueError(f"EngineConfig.cache_dir must be a path or None, got {self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
