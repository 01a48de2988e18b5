"""Sizes derived from a model's shape, defined once: the linears of a layer and their (out, in),
their packed shapes in each weights format, and the bytes of a KV-cache slot.

Every function takes a `ModelConfig` or `modelgen.Shape` (anything with hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads and head_dim).
Light on purpose (no kernels at import), so that `make-model` and sizing can use it.
"""

from __future__ import annotations

from typing import Protocol

from .options import KV_BLOCK_TOKENS, KV_CACHES, WEIGHTS_FORMATS

# the seven ternary linears of a layer, in checkpoint order, and the module that holds each
LINEAR_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LINEARS = tuple(LINEAR_MODULES)
KV_CACHE_ITEM_BYTES = {"f32": 4, "bf16": 2, "int8": 1}  # bytes of one K or V value, by EngineConfig.kv_cache
KV_CACHE_ROW_EXTRA_BYTES = {"int8": 4}  # and of each row (one token, one KV head): int8's float32 scale (kernels/kv8.py)


class ModelShape(Protocol):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def head_dim(self) -> int: ...


def module_of(name: str) -> str:
    """"self_attn" or "mlp": where linear `name` sits in a Hugging Face checkpoint."""
    return LINEAR_MODULES[name]


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a layer, in LINEARS order."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def packed_shape(weights_format: str, out: int, fan_in: int) -> tuple[int, int]:
    """The uint8 array of an (out, in) ternary linear: "2bit" is Hugging Face's packing (four
    output rows a byte: (out / 4, in)); "1.6bit" is base 3 (five weights a byte, rows padded to
    whole blocks: `kernels.base3.packed_cols`)."""
    if weights_format == "2bit":
        return out // 4, fan_in
    if weights_format == "1.6bit":
        from ternpool.kernels.base3 import packed_cols  # the layout's own rule; loads the kernels

        return out, packed_cols(fan_in)
    raise ValueError(f"weights format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}")


def kv_blocks(max_context: int) -> int:
    """Blocks of KV_BLOCK_TOKENS positions that hold `max_context` positions."""
    return -(-max_context // KV_BLOCK_TOKENS)


def kv_bytes_per_slot(shape: ModelShape, max_context: int, kv_cache: str = "f32") -> int:
    """Bytes of one slot's K and V caches holding `max_context` tokens in every layer (rounded up to
    whole blocks of KV_BLOCK_TOKENS), in the cache dtype `kv_cache` ("f32", "bf16" or "int8": values
    plus a scale a row)."""
    if kv_cache not in KV_CACHE_ITEM_BYTES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    row = shape.head_dim * KV_CACHE_ITEM_BYTES[kv_cache] + KV_CACHE_ROW_EXTRA_BYTES.get(kv_cache, 0)
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * row * kv_blocks(max_context) * KV_BLOCK_TOKENS
