"""`ModelConfig`: what ternpool reads from a BitNet b1.58 `config.json`.

Only the options the forward pass implements are accepted; anything else is
rejected with a message naming the file and key, never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

LINEAR_CLASSES = ("autobitlinear", "bitlinear")
QUANT_MODES = ("offline", "online")


class ModelFormatError(ValueError):
    """The model directory does not hold a BitNet model ternpool can run."""


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    linear_class: str = "autobitlinear"  # "autobitlinear": y *= weight_scale; "bitlinear": y /= weight_scale
    quantization_mode: str = "offline"  # "offline": packed uint8; "online": bf16 [out, in]

    @property
    def scale_divides(self) -> bool:
        return self.linear_class == "bitlinear"

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json",
                  extra_eos: tuple[int, ...] = ()) -> "ModelConfig":
        def bad(msg: str) -> ModelFormatError:
            return ModelFormatError(f"{source}: {msg}")

        arch = cfg.get("architectures") or []
        arch = arch if isinstance(arch, list) else [arch]
        if cfg.get("model_type") != "bitnet" or "BitNetForCausalLM" not in arch:
            raise bad(f"expected model_type 'bitnet' and architectures ['BitNetForCausalLM'], "
                      f"found model_type {cfg.get('model_type')!r}, architectures {arch!r}")
        qc = cfg.get("quantization_config")
        if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
            raise bad(f"expected quantization_config with quant_method 'bitnet', found {qc!r}")
        linear_class = qc.get("linear_class", "bitlinear")  # transformers' default
        if linear_class not in LINEAR_CLASSES:
            raise bad(f"quantization_config.linear_class must be one of {LINEAR_CLASSES}, found {linear_class!r}")
        mode = qc.get("quantization_mode", "offline")
        if mode not in QUANT_MODES:
            raise bad(f"quantization_config.quantization_mode must be one of {QUANT_MODES}, found {mode!r}")
        if mode == "online" and linear_class != "autobitlinear":
            raise bad("quantization_mode 'online' (bf16 weights) requires linear_class 'autobitlinear'")
        if qc.get("use_rms_norm"):
            raise bad("quantization_config.use_rms_norm: true is not supported by ternpool")
        if cfg.get("hidden_act", "relu2") != "relu2":
            raise bad(f"hidden_act must be 'relu2', found {cfg.get('hidden_act')!r}")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise bad(f"{key}: true is not supported by ternpool")
        if cfg.get("tie_word_embeddings", True) is not True:
            raise bad("tie_word_embeddings must be true (ternpool uses the embedding as output head)")
        rope = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters") or {}
        if not isinstance(rope_params, dict):
            raise bad(f"rope_parameters must be an object, found {type(rope_params).__name__}")
        if rope or rope_params.get("rope_type", "default") != "default":
            raise bad(f"RoPE scaling is not supported, found rope_scaling={rope!r}")
        def num(key: str, default=None, kind=int, low: float = 1):
            """cfg[key] (or `default`) as `kind`, finite and >= low; names the key and range otherwise."""
            value = cfg.get(key, default)
            if value is None:
                raise bad(f"missing required key {key!r}")
            wanted = "an integer" if kind is int else "a finite number"
            ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int
                                                  else isinstance(value, (int, float)) and math.isfinite(value))
            if not ok or value < low or (kind is float and low == 0 and value == 0):
                rng = f">= {low}" if kind is int else "> 0"
                raise bad(f"{key} must be {wanted} {rng}, found {value!r}")
            return kind(value)

        hidden = num("hidden_size")
        heads = num("num_attention_heads")
        kv_heads = num("num_key_value_heads", heads)
        if cfg.get("head_dim") is None and hidden % heads:
            raise bad(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                      "when head_dim is not given")
        head_dim = num("head_dim", hidden // heads)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        for e in eos_ids + tuple(extra_eos):
            if isinstance(e, bool) or not isinstance(e, int) or e < 0:
                raise bad(f"eos_token_id must be an integer >= 0 or a list of them, found {e!r}")
        vocab = num("vocab_size")
        bos = num("bos_token_id", 0, low=0)
        for name, ids in (("bos_token_id", (bos,)), ("eos_token_id", eos_ids)):
            if any(i >= vocab for i in ids):
                raise bad(f"{name} must be below vocab_size ({vocab}), found {list(ids)}")
        out = cls(
            hidden_size=hidden,
            intermediate_size=num("intermediate_size"),
            num_hidden_layers=num("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            rope_theta=num("rope_theta", rope_params.get("rope_theta", 500000.0), float, 0),
            rms_norm_eps=num("rms_norm_eps", 1e-5, float, 0),
            max_position_embeddings=num("max_position_embeddings", 4096),
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos_ids + tuple(extra_eos))),
            linear_class=linear_class,
            quantization_mode=mode,
        )
        if heads % kv_heads:
            raise bad(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
        if head_dim % 2:
            raise bad(f"head_dim must be even for RoPE, found {head_dim}")
        return out

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        cfg = read_json(path)
        extra: tuple[int, ...] = ()
        gen = model_dir / "generation_config.json"
        if gen.exists():
            eos = read_json(gen).get("eos_token_id")
            if eos is not None:
                extra = tuple(eos) if isinstance(eos, list) else (eos,)
        return cls.from_dict(cfg, source=str(path), extra_eos=extra)


def read_json(path: Path, data: bytes | None = None) -> dict:
    """A model JSON file (or its bytes, `data`) that must hold an object. ModelFormatError naming the
    file when it is missing, not JSON, nested too deeply, or not an object; the message never
    quotes the file's bytes (it may not be a model file at all)."""
    try:
        if data is not None:
            return _object(path, json.loads(data.decode("utf-8")))
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found (is this a Hugging Face model directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({_reason(e)})") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: JSON nested too deeply to be a model file") from None
    return _object(path, data)


def _object(path: Path, data) -> dict:
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _reason(e: ValueError) -> str:
    """Why a file is not JSON, without quoting its bytes."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at line {e.lineno} column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 at byte {e.start}"
    return type(e).__name__
