"""transformers' BitNet run in float64 throughout: the reference that numerical noise is measured against.

`model.double()` alone is not a float64 computation: transformers' BitNet keeps three steps in float32
whatever the model's dtype (RMSNorm casts to float32, ActQuant casts to float32 before it rounds, and the
rotary angles and their cos/sin are float32; its default attention, sdpa, does follow the dtype). Its
float32 model then shares those steps bit for bit with the "float64" one, so against `model.double()`
transformers fp32 looks closer than any other float32 implementation can be: a norm that sums in another
order flips int8 activations against it, which are no error at all. `float64_everywhere()` lifts the
three casts, so every step of the reference is float64 and ours and transformers fp32 are measured
against the same thing.

Shared by the parity test (tests/unit/test_parity.py) and tests/tools/numerical_noise.py; imported as
`float64_oracle` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import bitnet as hf_bitnet
from transformers.models.bitnet import modeling_bitnet as hf_model

# about 13 tokens a sentence with any of the test vocabularies; cut to the prompt lengths wanted
TEXT = ("The river ran quietly past the old mill, carrying leaves and small branches toward the sea. "
        "Children played on the bank while their parents talked about the harvest, the weather, "
        "and the price of bread in the town market. A stranger arrived one evening with a cart of books, "
        "maps and letters from the cities beyond the mountains; nobody knew his name. ") * 16


def prompt_ids(tokenizer, bos: int, length: int) -> list[int]:
    """`length` token ids: the beginning-of-text token alone, or the start of TEXT."""
    ids = [bos] if length == 1 else tokenizer.encode(TEXT)[:length]
    assert len(ids) == length, f"TEXT gives {len(ids)} tokens, {length} wanted"
    return ids


def load(path, dtype: torch.dtype):
    """transformers' BitNet from a model directory, every tensor in `dtype` (from_pretrained leaves the
    embedding and norms in bf16)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(dtype).eval()


def _rms_norm(self, x):
    variance = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


def _act_quant(ctx, x):
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


def _rotary(self, x, position_ids):
    d = 2 * self.inv_freq.shape[0]
    theta = float(self.config.rope_parameters["rope_theta"])
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = position_ids[..., None].double() * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def float64_everywhere():
    """Within: transformers' BitNet computes its norms, activation quantization and rotary tables in the
    dtype of its inputs (float64 for a `.double()` model) instead of float32. Run only the float64 model
    inside (a float32 one would get float64 rotary angles: no longer transformers fp32)."""
    saved = hf_model.BitNetRMSNorm.forward, hf_bitnet.ActQuant.forward, hf_model.BitNetRotaryEmbedding.forward
    hf_model.BitNetRMSNorm.forward = _rms_norm
    hf_bitnet.ActQuant.forward = staticmethod(_act_quant)
    hf_model.BitNetRotaryEmbedding.forward = _rotary
    try:
        yield
    finally:
        hf_model.BitNetRMSNorm.forward = saved[0]
        hf_bitnet.ActQuant.forward = staticmethod(saved[1])
        hf_model.BitNetRotaryEmbedding.forward = saved[2]


def logits(model, ids: list[int], float64: bool = False) -> np.ndarray:
    """Teacher-forced logits (len(ids), vocab) float64 at every position of one forward pass."""
    with torch.no_grad(), (float64_everywhere() if float64 else contextlib.nullcontext()):
        return model(torch.tensor([ids])).logits[0].double().numpy()


def noise(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, median |logit error|) of logits `got` against `ref`, both (positions, vocab)."""
    top1 = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
    return top1, float(np.median(np.abs(np.asarray(got, np.float64) - ref)))
