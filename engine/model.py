"""The BitNet b1.58 forward pass over a ragged batch of tokens with a slotted KV cache.

One call of `BitNetModel.forward` takes N tokens from any number of
sequences: each token carries its cache slot and position, so prefill
chunks of new prompts and single decode tokens of running ones share one
pass (continuous batching). Per layer (pre-norm, residual):

    h = x + o_proj(attn_sub_norm(attention(input_layernorm(x))))
    x = h + down_proj(ffn_sub_norm(relu(gate_proj(y))**2 * up_proj(y)))   y = post_attention_layernorm(h)
    logits = embed_tokens @ norm(x)                                       tied head, bf16 weights

Every operation is per token, so a token's logits do not depend on what
else is in the batch.
"""

from __future__ import annotations

import mmap

import numpy as np

from ternpool.kernels import (attention, bf16_matmul, bf16_to_f32, dequant_factors, f32_to_bf16, quantize_rows,
                              ternary_linears)
from ternpool.kernels.base3 import base3_linear
from ternpool.kernels.head8 import head_i8, quantize_head
from ternpool.kernels.kv8 import quantize_kv, row_width
from ternpool.kernels.norm import norm_quantize, rms_norm
from ternpool.kernels.rope import apply_rope

from .config import ModelConfig
from .options import DEFAULT_HEAD, HEADS, KV_BLOCK_TOKENS, KV_CACHES
from .shapes import kv_blocks, kv_bytes_per_slot
from .weights import ModelWeights, TernaryLinear


# the KV cache's storage: float32, bf16 as its uint16 bits (half the bytes; kernels/bf16.py), or int8 rows
# with their scale (a quarter of the bytes plus 4 a row; kernels/kv8.py)
KV_CACHE_DTYPES = {"f32": np.dtype(np.float32), "bf16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}


def lazy_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Zeros whose memory is committed page by page as it is written.

    np.zeros is lazy too, but with transparent huge pages one written
    position commits 2 MB; the cache would then cost its full size at once.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (length, head_dim // 2) float32, computed like transformers (fp32 angles).

    The inverse frequencies are bit-identical to transformers': 1 / theta ** (2i / d) in float32 with the
    power correctly rounded, as torch's is (NumPy's float32 power is off by one ulp for about a fifth of
    them, which moved angles by up to 3e-5 at position 350 and flipped int8 activations downstream).
    cos and sin of the float32 angles are rounded from float64 (torch's own are within one ulp of these).
    """
    d = cfg.head_dim
    exponents = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)  # (d/2,)
    inv_freq = np.float32(1.0) / (float(cfg.rope_theta) ** exponents.astype(np.float64)).astype(np.float32)
    angles = (np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)  # (L, d/2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Quantized:
    """Activations normed and quantized once (`norm_quantize`) and shared by every linear that reads them."""

    def __init__(self, x: np.ndarray, norm: np.ndarray | None = None, eps: float = 0.0,
                 gate: np.ndarray | None = None):
        """x normed by `norm` (its weight; gated by relu(gate)**2 first, if given) and quantized, or x
        quantized as it is when `norm` is None."""
        self.q, self.qsum, self.scale = (quantize_rows(x) if norm is None and gate is None
                                         else norm_quantize(x, norm, eps, gate))

    def __call__(self, *lins: TernaryLinear) -> np.ndarray | list[np.ndarray]:
        """The output of each linear (one array for one linear); 2-bit linears share one kernel call."""
        factors = [dequant_factors(self.scale, lin.weight_scale, lin.divides) for lin in lins]
        if lins[0].layout == "b3":
            outs = [base3_linear(lin.packed, self.q, self.qsum, div, mul) for lin, (div, mul) in zip(lins, factors)]
        else:
            outs = ternary_linears([lin.packed for lin in lins], self.q, self.qsum, *zip(*factors))
        return outs[0] if len(lins) == 1 else outs


class BitNetModel:
    """Weights plus a KV cache of `slots` sequences x `max_context` positions, float32, bf16 or int8
    (`kv_cache`: "bf16" halves its bytes and the attention's reads, K and V rounded to bf16 as they
    are written; "int8" quarters them, each token's K and V of each KV head quantized to int8 with one
    float32 scale; attention computes in float32 either way).

    The cache is paged: a pool of `blocks` blocks of KV_BLOCK_TOKENS positions (slots x the blocks of
    max_context), and a block table whose row s lists the blocks of sequence slot s in position order.
    `block_table`, used when a call gives none, is a slotted cache: slot s owns blocks s * per_slot ...
    The engine passes its own table, which shares the blocks of common prompt prefixes between
    sequences (engine/blocks.py); `outside_writes` counts the calls that wrote through the default one
    (the engine then forgets what its blocks held)."""

    def __init__(self, weights: ModelWeights, slots: int, max_context: int, head: str = DEFAULT_HEAD,
                 kv_cache: str = "f32"):
        cfg = weights.config
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
        self.head, self.kv_cache = head, kv_cache
        # int8 head: the tied embedding quantized per row (half the bytes read per token); mapped from
        # a native file, or quantized here once
        self.head_i8 = None
        if head == "int8":
            self.head_i8 = ((weights.head_q, weights.head_scale) if weights.head_q is not None
                            else quantize_head(weights.embed))
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if not 1 <= max_context <= cfg.max_position_embeddings:
            raise ValueError(f"max_context must be in 1..{cfg.max_position_embeddings}, got {max_context}")
        self.weights, self.config = weights, cfg
        self.slots, self.max_context = slots, max_context
        width = row_width(cfg.head_dim) if kv_cache == "int8" else cfg.head_dim  # int8: D values + scale
        per_slot = kv_blocks(max_context)
        self.blocks = slots * per_slot
        self.block_table = np.arange(self.blocks, dtype=np.int64).reshape(slots, per_slot)
        self.outside_writes = 0
        shape = (cfg.num_hidden_layers, self.blocks, cfg.num_key_value_heads, KV_BLOCK_TOKENS, width)
        self.k_cache = lazy_zeros(shape, KV_CACHE_DTYPES[kv_cache])  # (L, blocks, KVH, B, D or D + 4)
        self.v_cache = lazy_zeros(shape, KV_CACHE_DTYPES[kv_cache])
        self.cos, self.sin = rope_tables(cfg, max_context)
        self.scale = np.float32(cfg.head_dim ** -0.5)

    @property
    def kv_bytes_per_slot(self) -> int:
        """Bytes of one slot's K and V caches when full."""
        return kv_bytes_per_slot(self.config, self.max_context, self.kv_cache)

    def forward(self, tokens: np.ndarray, pos: np.ndarray, slots: np.ndarray,
                logit_rows: np.ndarray | None = None, table: np.ndarray | None = None) -> np.ndarray:
        """tokens, pos, slots (N,) -> logits (M, vocab) for the rows `logit_rows` (default: all)."""
        return self.logits(self.hidden(tokens, pos, slots, logit_rows, table))

    def hidden(self, tokens: np.ndarray, pos: np.ndarray, slots: np.ndarray,
               logit_rows: np.ndarray | None = None, table: np.ndarray | None = None) -> np.ndarray:
        """The final-normed hidden states (M, hidden) that the output head reads; writes the cache
        through `table` (slots, blocks of max_context) of block ids (None: the slotted `block_table`)."""
        cfg, w = self.config, self.weights
        tokens = np.asarray(tokens, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        slots = np.asarray(slots, dtype=np.int64)
        N, D, eps = tokens.shape[0], cfg.head_dim, cfg.rms_norm_eps
        cos, sin = self.cos[pos], self.sin[pos]  # (N, D/2)
        if N and int(pos.max()) >= self.max_context:
            raise ValueError(f"position {int(pos.max())} is past the context {self.max_context}")
        if table is None:
            table = self.block_table
            self.outside_writes += 1
        blocks, offsets = table[slots, pos // KV_BLOCK_TOKENS], pos % KV_BLOCK_TOKENS  # where K, V go
        x = bf16_to_f32(w.embed[tokens])  # (N, hidden)
        for li, layer in enumerate(w.layers):
            a = Quantized(x, layer.input_norm, eps)
            q, k, v = a(layer.q_proj, layer.k_proj, layer.v_proj)
            q = apply_rope(q.reshape(N, -1, D), cos, sin)  # (N, H, D)
            k = apply_rope(k.reshape(N, -1, D), cos, sin)  # (N, KVH, D)
            v = v.reshape(N, -1, D)  # (N, KVH, D)
            kc, vc = self.k_cache[li], self.v_cache[li]  # (blocks, KVH, B, D or D + 4)
            kc[blocks, :, offsets, :] = self._to_cache(k)
            vc[blocks, :, offsets, :] = self._to_cache(v)
            att = attention(q, kc, vc, slots, pos, self.scale, table).reshape(N, -1)  # (N, H*D)
            x = x + Quantized(att, layer.attn_sub_norm, eps)(layer.o_proj)  # (N, hidden)
            m = Quantized(x, layer.post_attention_norm, eps)
            gate, up = m(layer.gate_proj, layer.up_proj)
            ffn = Quantized(up, layer.ffn_sub_norm, eps, gate=gate)  # normed relu(gate)**2 * up
            x = x + ffn(layer.down_proj)  # (N, hidden)
        if logit_rows is not None:
            x = x[np.asarray(logit_rows, dtype=np.int64)]
        return rms_norm(x, w.norm, eps)  # (M, hidden)

    def _to_cache(self, x: np.ndarray) -> np.ndarray:
        """K or V (N, KVH, D) float32 in the cache's dtype (bf16: rounded to nearest even; int8: rows
        (N, KVH, D + 4) of values and scale)."""
        if self.kv_cache == "int8":
            return quantize_kv(x)
        return f32_to_bf16(x) if self.kv_cache == "bf16" else x

    def logits(self, h: np.ndarray, head: str | None = None) -> np.ndarray:
        """Output head on final-normed hidden states h (M, hidden): this model's head, or `head`."""
        head = head or self.head
        if head == "int8":
            if self.head_i8 is None:
                w = self.weights
                self.head_i8 = ((w.head_q, w.head_scale) if w.head_q is not None else quantize_head(w.embed))
            return head_i8(*self.head_i8, h)  # approximate
        return bf16_matmul(self.weights.embed, h)  # exact bf16 weights
