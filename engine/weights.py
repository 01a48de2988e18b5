"""Loading BitNet b1.58 weights from a Hugging Face directory into ternpool's layout.

Linears stay ternary and 2-bit packed in the Hugging Face layout (see
`ternpool.kernels.ternary`), memory-mapped straight from the file when it is
already packed (`quantization_mode: offline`), or ternarized once at load
from bf16 (`online`) with transformers' rule: effective weight
`round(W / mean|W|).clamp(-1, 1) * mean|W|`. The embedding stays bf16 and
doubles as the output head. Errors name the file and tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ternpool.kernels import bf16_to_f32, pack_ternary

from .config import ModelConfig, ModelFormatError
from .safetensors_io import TensorInfo, index_model
from .shapes import LINEARS, linear_shapes, module_of, packed_shape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TernaryLinear:
    packed: np.ndarray  # uint8: "i2" (out // 4, in), HF layout; "b3" (out, 32 * ceil(in / 160)), base 3
    weight_scale: float  # as stored (or mean|W| for bf16 weights)
    divides: bool = False  # BitLinear: y = acc / (s * weight_scale); else y = acc / s * weight_scale
    layout: str = "i2"  # "i2": 2 bits a weight; "b3": 1.6 bits (5 weights a byte)
    in_features: int | None = None  # needed for "b3" (its rows are padded to whole blocks)

    @property
    def scale(self) -> float:
        """The factor that multiplies the output."""
        return 1.0 / self.weight_scale if self.divides else self.weight_scale

    @property
    def out_features(self) -> int:
        return 4 * self.packed.shape[0] if self.layout == "i2" else self.packed.shape[0]


@dataclass(frozen=True)
class LayerWeights:
    input_norm: np.ndarray  # (hidden,) float32
    post_attention_norm: np.ndarray  # (hidden,)
    attn_sub_norm: np.ndarray  # (hidden,)
    ffn_sub_norm: np.ndarray  # (intermediate,)
    q_proj: TernaryLinear
    k_proj: TernaryLinear
    v_proj: TernaryLinear
    o_proj: TernaryLinear
    gate_proj: TernaryLinear
    up_proj: TernaryLinear
    down_proj: TernaryLinear


@dataclass(frozen=True)
class ModelWeights:
    config: ModelConfig
    embed: np.ndarray  # uint16 bf16 (vocab, hidden); also the tied output head
    norm: np.ndarray  # (hidden,) float32
    layers: tuple[LayerWeights, ...]
    head_q: np.ndarray | None = None  # int8 (vocab, hidden) head from a native file, else made at load
    head_scale: np.ndarray | None = None  # float32 (vocab,)
    weights_format: str = "2bit"

    @property
    def linear_bytes(self) -> int:
        return sum(getattr(layer, name).packed.nbytes for layer in self.layers for name in LINEARS)

    @property
    def nbytes(self) -> int:
        return self.embed.nbytes + self.norm.nbytes + self.linear_bytes


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Checkpoint tensor name -> (shape, accepted dtypes): the table from HF names to ours."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    floats = ("BF16", "F32", "F16")
    out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "model.embed_tokens.weight": ((cfg.vocab_size, h), ("BF16",)),
        "model.norm.weight": ((h,), floats),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = ((h,), floats)
        out[p + "post_attention_layernorm.weight"] = ((h,), floats)
        out[p + "self_attn.attn_sub_norm.weight"] = ((h,), floats)
        out[p + "mlp.ffn_sub_norm.weight"] = ((i,), floats)
        for name, (o, k) in linear_shapes(cfg).items():
            base = f"{p}{module_of(name)}.{name}."
            if cfg.quantization_mode == "online":
                out[base + "weight"] = ((o, k), floats)
            else:
                if o % 4:
                    raise ModelFormatError(f"{base}weight: packed linears need an output size that is a "
                                           f"multiple of 4, the config gives {o}")
                out[base + "weight"] = (packed_shape("2bit", o, k), ("U8",))  # Hugging Face packing
                out[base + "weight_scale"] = ((1,), floats)
    return out


def as_f32(info: TensorInfo, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """A tensor (or its rows start:stop) as float32."""
    a = info.load()
    if start is not None or stop is not None:
        a = np.asarray(a[start:stop])
    if info.dtype == "BF16":
        return bf16_to_f32(a)
    return np.asarray(a, dtype=np.float32)


def online_factors(mean_abs: float) -> tuple[np.float32, float]:
    """transformers' online rule for a tensor with this mean |W|: the float32 factor s that
    ternarizes (clamp(round(W * s), -1, 1)) and the effective weight scale 1 / s."""
    s = np.float32(1.0) / np.float32(max(np.float32(mean_abs), np.float32(1e-5)))
    return s, float(np.float32(1.0) / s)


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """transformers' online rule for a float (out, in) weight: (ternary int8, effective scale)."""
    w = np.asarray(w, dtype=np.float32)
    s, scale = online_factors(float(np.float32(np.abs(w).mean(dtype=np.float64))))
    return np.clip(np.round(w * s), -1, 1).astype(np.int8), scale


def _linear(tensors: dict[str, TensorInfo], base: str, cfg: ModelConfig) -> TernaryLinear:
    weight = tensors[base + "weight"]
    if cfg.quantization_mode == "online":
        t, scale = ternarize(as_f32(weight))
        return TernaryLinear(pack_ternary(t), scale)
    ws = float(as_f32(tensors[base + "weight_scale"])[0])
    if not np.isfinite(ws) or ws == 0.0:
        raise ModelFormatError(f"{weight.path}: tensor {base}weight_scale is {ws}, expected a finite non-zero scale")
    return TernaryLinear(weight.load(), ws, cfg.scale_divides)


def check_tensors(model_dir: Path, tensors: dict[str, TensorInfo], cfg: ModelConfig) -> None:
    """Every tensor of a Hugging Face checkpoint present, known, and of the config's shape and dtype."""
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in tensors]
    if missing:
        files = sorted({str(t.path) for t in tensors.values()}) or [str(model_dir)]
        raise ModelFormatError(f"{', '.join(files[:3])}: missing tensor(s) {missing[:5]}"
                               f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''}")
    unknown = [n for n in tensors if n not in expected]
    if unknown:
        t = tensors[unknown[0]]
        hint = " (lm_head.weight: ternpool needs tied embeddings)" if "lm_head.weight" in unknown else ""
        raise ModelFormatError(f"{t.path}: unexpected tensor(s) {unknown[:5]} for this config{hint}")
    for name, (shape, dtypes) in expected.items():
        t = tensors[name]
        if t.dtype not in dtypes or t.shape != shape:
            raise ModelFormatError(f"{t.path}: tensor {name} is {t.dtype}{list(t.shape)}, expected "
                                   f"{'/'.join(dtypes)}{list(shape)}")


def check_native_tensors(path: Path, tensors: dict[str, TensorInfo], specs) -> None:
    """Every tensor of a native weights file (`specs`: its `TensorSpec`s for the config) present and
    of the expected shape and dtype, and no other."""
    for spec in specs:
        t = tensors.get(spec.name)
        if t is None:
            raise ModelFormatError(f"{path}: missing tensor {spec.name}")
        if t.dtype != spec.dtype or t.shape != spec.shape:
            raise ModelFormatError(f"{path}: tensor {spec.name} is {t.dtype}{list(t.shape)}, expected "
                                   f"{spec.dtype}{list(spec.shape)} for this config.json")
    unknown = sorted(set(tensors) - {spec.name for spec in specs})
    if unknown:
        raise ModelFormatError(f"{path}: unexpected tensor(s) {unknown[:5]} for this config.json")


def load_weights(model_dir: str | Path, cfg: ModelConfig) -> ModelWeights:
    """Check every tensor of a Hugging Face checkpoint against the config, then map/convert them."""
    model_dir = Path(model_dir)
    tensors = index_model(model_dir)
    check_tensors(model_dir, tensors, cfg)
    layers = []
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        lin = {name: _linear(tensors, f"{p}{module_of(name)}.{name}.", cfg) for name in LINEARS}
        layers.append(LayerWeights(
            input_norm=as_f32(tensors[p + "input_layernorm.weight"]).copy(),
            post_attention_norm=as_f32(tensors[p + "post_attention_layernorm.weight"]).copy(),
            attn_sub_norm=as_f32(tensors[p + "self_attn.attn_sub_norm.weight"]).copy(),
            ffn_sub_norm=as_f32(tensors[p + "mlp.ffn_sub_norm.weight"]).copy(),
            **lin,
        ))
    embed = tensors["model.embed_tokens.weight"].load()
    norm = as_f32(tensors["model.norm.weight"]).copy()
    w = ModelWeights(cfg, embed, norm, tuple(layers))
    log.info("loaded %d layers from %s (%.1f MB of weights, %s)", cfg.num_hidden_layers, model_dir,
             w.nbytes / 1e6, cfg.quantization_mode)
    return w
