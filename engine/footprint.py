"""How much memory a model needs on a node, from its config alone (nothing is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .options import KV_BLOCK_TOKENS
from .shapes import kv_blocks, kv_bytes_per_slot, linear_shapes, packed_shape

# Python, NumPy, Numba, the tokenizer and activations of one step: measured ~0.35 GB for 2b4t
RUNTIME_BYTES = 512 * 2 ** 20


def linear_bytes(cfg: ModelConfig, weights_format: str) -> int:
    """Bytes of all ternary linears in a weights format ("2bit" or "1.6bit")."""
    rows_cols = [packed_shape(weights_format, out, k) for out, k in linear_shapes(cfg).values()]
    return sum(r * c for r, c in rows_cols) * cfg.num_hidden_layers


@dataclass(frozen=True)
class Footprint:
    weights: int  # bytes read every step: linears + output head (resident)
    kv_cache: int  # all slots' full KV cache
    runtime: int = RUNTIME_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime


def footprint(cfg: ModelConfig, weights_format: str, head: str, slots: int, max_context: int,
              kv_cache: str = "f32") -> Footprint:
    """Resident memory of one worker: the linears, the output head (bf16 embedding or int8 copy plus
    row scales), the KV cache (`kv_cache`: "f32", "bf16" or "int8") of every slot filled to `max_context`, and
    the runtime."""
    head_bytes = cfg.vocab_size * cfg.hidden_size * (2 if head == "bf16" else 1)
    if head == "int8":
        head_bytes += 4 * cfg.vocab_size
    return Footprint(linear_bytes(cfg, weights_format) + head_bytes,
                     slots * kv_bytes_per_slot(cfg, max_context, kv_cache))


def kv_pool_text(slots: int, max_context: int, slot_bytes: int, kv_cache: str) -> str:
    """The KV cache as the engine holds it, for `bench model` and `submit --dry-run`: one pool of blocks,
    slots x max_context of them in all, and what the prefix cache keeps in the idle ones."""
    per_slot = kv_blocks(max_context)
    return (f"KV cache {_gb(slots * slot_bytes)} {kv_cache}: {slots} slots x {max_context} tokens = {slots * per_slot} "
            f"blocks of {KV_BLOCK_TOKENS} tokens ({_size(slot_bytes / per_slot)} each); blocks no running "
            f"sequence holds keep finished prompts' prefixes for the prefix cache, so caching adds no memory")


def _size(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def fit_problem(cfg: ModelConfig, weights_format: str, head: str, slots: int, max_context: int,
                node_memory: int, object_store: int = 0, kv_cache: str = "f32") -> str | None:
    """None when one worker fits `node_memory` bytes (what the node has for workers, Ray's object
    store already taken out); else a message saying what would fit."""
    fp = footprint(cfg, weights_format, head, slots, max_context, kv_cache)
    if fp.total <= node_memory:
        return None
    msg = (f"one worker needs {_gb(fp.total)}: weights {_gb(fp.weights)} ({weights_format}, {head} head), "
           f"KV cache {_gb(fp.kv_cache)} ({slots} slots x {max_context} tokens, {kv_cache}), "
           f"runtime {_gb(fp.runtime)}; "
           f"the node has {_gb(node_memory)} for workers" + (f" (Ray's object store takes {_gb(object_store)})"
                                                              if object_store else ""))
    room = node_memory - fp.weights - fp.runtime
    per_slot = kv_bytes_per_slot(cfg, max_context, kv_cache)
    per_token = kv_bytes_per_slot(cfg, KV_BLOCK_TOKENS, kv_cache) // KV_BLOCK_TOKENS  # the cache holds whole blocks
    hints = []
    if room >= per_slot:
        hints.append(f"--slots {room // per_slot} at this context")
    if room >= per_token * slots * KV_BLOCK_TOKENS:
        fits = room // (slots * per_token) // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
        hints.append(f"--max-context {min(max_context, fits)} with {slots} slots")
    if kv_cache == "f32" and room >= fp.kv_cache // 2:
        hints.append("--kv-cache bf16 (half the KV cache)")
    int8_kv = slots * kv_bytes_per_slot(cfg, max_context, "int8")
    if kv_cache != "int8" and room >= int8_kv:
        hints.append(f"--kv-cache int8 (KV cache {_gb(int8_kv)})")
    small = footprint(cfg, "1.6bit", "int8", 1, min(max_context, 512), kv_cache)
    if (weights_format, head) != ("1.6bit", "int8"):
        hints.append(f"--weights-format 1.6bit --head int8 (weights {_gb(small.weights)})")
    if not hints or small.total > node_memory:
        hints.append(f"a node with at least {_gb(small.total)} (1.6bit weights, int8 head, 1 slot x "
                     f"{min(max_context, 512)} tokens)")
    return msg + ". Would fit: " + "; or ".join(hints)
