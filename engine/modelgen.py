"""Random BitNet b1.58 models in the exact Hugging Face format (`ternpool make-model`).

No weights can be downloaded on these machines, so tests and benchmarks use
models made here: config.json, generation_config.json, safetensors (one
file or sharded with an index) and tokenizer files, exactly as
`microsoft/bitnet-b1.58-2B-4T` (packed) or its `-bf16` variant lay them out.

Random weights are scaled to behave like a trained model rather than noise:
the embedding is small next to what each block adds to the residual stream
(so the last token does not simply repeat itself), weight scales keep
q/k/v and MLP activations of order one (so attention is soft, not an
argmax), and the final norm gives logits with a spread of a few units.
Every tensor is drawn from its own seeded stream and written one at a time,
so models larger than RAM can be made.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .safetensors_io import INDEX_FILE, SINGLE_FILE, TensorSpec, write_safetensors
from .shapes import linear_shapes, module_of, packed_shape

log = logging.getLogger(__name__)

FORMATS = ("packed", "bf16")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # 128256 means the Llama-3 tokenizer; anything else a small trained BPE
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


LLAMA3_VOCAB = 128256
SHAPES: dict[str, Shape] = {
    "tiny": Shape(64, 176, 2, 4, 2, 512, max_position_embeddings=2048),
    "2b4t": Shape(2560, 6912, 30, 20, 5, LLAMA3_VOCAB),  # microsoft/bitnet-b1.58-2B-4T
    # bitnet.cpp-style dummy shapes for scale work
    "700m": Shape(1536, 4096, 24, 16, 16, LLAMA3_VOCAB),
    "3b": Shape(3200, 8640, 26, 32, 32, LLAMA3_VOCAB),
    "8b": Shape(4096, 14336, 32, 32, 8, LLAMA3_VOCAB),
    "100b": Shape(8192, 45568, 72, 64, 16, LLAMA3_VOCAB),
}

# Target spreads (standard deviations) of the random model's activations.
_EMBED_STD = 0.02  # the token embedding, small next to what blocks add
_PROJ_STD = 1.0  # q/k/v, gate/up outputs
_RESID_STD = 1.0  # o_proj/down_proj outputs added to the residual
_LOGIT_STD = 4.0  # final logits


# byte value of the four ternary codes (digit + 0..2 in bits 0-1, 2-3, 4-5, 6-7) of each n in 0..80
_BASE81_TO_PACKED = np.array([sum((n // 3**i % 3) << (2 * i) for i in range(4)) for n in range(81)],
                             dtype=np.uint8)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _norm_gain(name: str, s: Shape) -> float:
    if name == "model.norm.weight":  # logits = embed . norm(x): spread _LOGIT_STD
        return _LOGIT_STD / (_EMBED_STD * np.sqrt(s.hidden_size))
    return 1.0


def _target_std(linear: str) -> float:
    return _RESID_STD if linear.endswith(("o_proj", "down_proj")) else _PROJ_STD


def check_shape(s: Shape) -> None:
    if s.hidden_size % s.num_attention_heads:
        raise ValueError(f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads "
                         f"{s.num_attention_heads}")
    if s.num_attention_heads % s.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if s.head_dim % 2:
        raise ValueError(f"head_dim {s.head_dim} must be even")
    for name, (out, _) in linear_shapes(s).items():
        if out % 4:
            raise ValueError(f"{name}: output size {out} must be a multiple of 4 for packed ternary weights")


class _Producer:
    """Makes each tensor on demand from its own seeded stream."""

    def __init__(self, s: Shape, seed: int, fmt: str, linear_class: str):
        self.s, self.seed, self.fmt, self.linear_class = s, seed, fmt, linear_class

    def packed(self, base: str, shape: tuple[int, int]) -> np.ndarray:
        """Uniform ternary weights (out, in), already packed: one draw in 0..80 is four base-3 digits."""
        rng = _rng(self.seed, base)
        return _BASE81_TO_PACKED[rng.integers(0, 81, size=packed_shape("2bit", *shape), dtype=np.uint8)]

    def scale(self, base: str, fan_in: int) -> float:
        # output std of a ternary linear on unit-RMS input: scale * sqrt(2/3 * fan_in)
        return _target_std(base) / np.sqrt(2.0 / 3.0 * fan_in)

    def _embed_rows(self, spec: TensorSpec, rows: int = 8192):
        from ternpool.kernels import f32_to_bf16  # here: the command line imports this module for SHAPES

        rng = _rng(self.seed, spec.name)
        vocab, hidden = spec.shape
        for a in range(0, vocab, rows):
            n = min(rows, vocab - a)
            yield f32_to_bf16(rng.standard_normal((n, hidden), dtype=np.float32) * np.float32(_EMBED_STD))

    def __call__(self, spec: TensorSpec) -> np.ndarray:
        from ternpool.kernels import f32_to_bf16, unpack_ternary  # here: the command line imports SHAPES

        name = spec.name
        if name == "model.embed_tokens.weight":  # in row blocks: 100b's is 4 GB as float32
            return self._embed_rows(spec)
        if name.endswith("norm.weight"):
            rng = _rng(self.seed, name)
            g = _norm_gain(name, self.s) * (1.0 + 0.1 * rng.standard_normal(spec.shape))
            return f32_to_bf16(g.astype(np.float32))
        base, _, leaf = name.rpartition(".")
        out, fan_in = linear_shapes(self.s)[base.rsplit(".", 1)[1]]  # base: "model.layers.N.self_attn.q_proj"
        scale = self.scale(base, fan_in)
        if leaf == "weight_scale":
            stored = 1.0 / scale if self.linear_class == "bitlinear" else scale
            return f32_to_bf16(np.array([stored], dtype=np.float32))
        packed = self.packed(base, (out, fan_in))
        if self.fmt == "packed":
            return packed
        t = unpack_ternary(packed)
        # bf16 "online" weights: |W| / mean|W| stays clear of the rounding boundaries 0.5 and 1.5
        # (zeros below 0.15, non-zeros in 1.1..1.85), so re-ternarizing recovers t exactly.
        rng = _rng(self.seed, base + ".noise")
        mag = np.where(t != 0, 1.0 + 0.25 * rng.uniform(-1, 1, t.shape), 0.1 * rng.uniform(-1, 1, t.shape))
        w = np.where(t != 0, t * mag, mag) * (scale / 0.683)
        return f32_to_bf16(w.astype(np.float32))


def _specs(s: Shape, fmt: str) -> list[TensorSpec]:
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (s.vocab_size, s.hidden_size))]
    for n in range(s.num_hidden_layers):
        p = f"model.layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm"):
            specs.append(TensorSpec(p + norm + ".weight", "BF16", (s.hidden_size,)))
        specs.append(TensorSpec(p + "mlp.ffn_sub_norm.weight", "BF16", (s.intermediate_size,)))
        for name, (out, fan_in) in linear_shapes(s).items():
            linear = f"{p}{module_of(name)}.{name}"
            if fmt == "packed":  # Hugging Face packing, which is ternpool's 2bit
                specs.append(TensorSpec(linear + ".weight", "U8", packed_shape("2bit", out, fan_in)))
                specs.append(TensorSpec(linear + ".weight_scale", "BF16", (1,)))
            else:
                specs.append(TensorSpec(linear + ".weight", "BF16", (out, fan_in)))
    specs.append(TensorSpec("model.norm.weight", "BF16", (s.hidden_size,)))
    return specs


def _config(s: Shape, fmt: str, linear_class: str, tok) -> dict:
    return {
        "architectures": ["BitNetForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "hidden_act": "relu2",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "model_type": "bitnet",
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "quantization_config": {
            "linear_class": linear_class,
            "quant_method": "bitnet",
            "quantization_mode": "offline" if fmt == "packed" else "online",
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s.vocab_size,
    }


def _split(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    total = sum(sp.nbytes for sp in specs)
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    done = 0
    for sp in specs:
        groups[min(shards - 1, int(done * shards / max(total, 1)))].append(sp)
        done += sp.nbytes
    return [g for g in groups if g]


def make_model(out: str | Path, shape: str | Shape = "tiny", *, layers: int | None = None,
               vocab: int | None = None, seed: int = 0, fmt: str = "packed",
               linear_class: str = "autobitlinear", shards: int = 1) -> Path:
    """Write a random BitNet model directory; returns its path."""
    from .tokenizer_files import write_llama3_tokenizer, write_small_tokenizer

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if layers is not None:
        shape = replace(shape, num_hidden_layers=layers)
    if vocab is not None:
        shape = replace(shape, vocab_size=vocab)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if linear_class not in ("autobitlinear", "bitlinear"):
        raise ValueError(f"linear_class must be 'autobitlinear' or 'bitlinear', got {linear_class!r}")
    if fmt == "bf16" and linear_class != "autobitlinear":
        raise ValueError("the bf16 format ('online' quantization) exists only with linear_class autobitlinear")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    check_shape(shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shape.vocab_size == LLAMA3_VOCAB:
        tok = write_llama3_tokenizer(out)
    else:
        tok = write_small_tokenizer(out, shape.vocab_size)
    if tok.vocab_size != shape.vocab_size:
        raise RuntimeError(f"tokenizer has {tok.vocab_size} ids, model vocab is {shape.vocab_size}")

    specs = _specs(shape, fmt)
    produce = _Producer(shape, seed, fmt, linear_class)
    groups = _split(specs, shards)
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(groups) == 1:
        write_safetensors(out / SINGLE_FILE, specs, produce)
    else:
        weight_map = {}
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(out / fname, group, produce)
            weight_map.update({sp.name: fname for sp in group})
        index = {"metadata": {"total_size": sum(sp.nbytes for sp in specs)}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(_config(shape, fmt, linear_class, tok), indent=2))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id, tok.eot_token_id],
           "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    log.info("wrote a random %s model to %s", fmt, out)
    return out
