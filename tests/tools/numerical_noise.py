"""Numerical noise of our forward pass and of transformers fp32, each against float64, step by step.

Prints three tables for a model of the 2b4t width (default: made here, 2 layers) and prompts of 1, ~100
and ~350 tokens, teacher-forced (logits at every position of one forward pass):

1. end to end: top-1 agreement and median |logit error| of ours (bf16 head, and int8 head), transformers
   fp32 and transformers `model.double()` against the float64 reference (transformers with its float32 casts lifted, see
   tests/float64_oracle.py), and of ours and fp32 against `model.double()` (what issue 14 first measured);
2. step by step: each step fed the reference's own float64 input (rounded to float32), its output's
   median and max error relative to the RMS of the reference's output, ours and transformers fp32 side
   by side (errors in the quantized linears are int8 codes that flip on the way in, equal for both);
3. ours with one step swapped for a float64 version: the end-to-end noise that step is responsible for.

Usage: python tests/tools/numerical_noise.py [--model DIR] [--vocab 4096] [--lengths 1,100,350]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: float64_oracle

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.models.bitnet.modeling_bitnet import apply_rotary_pos_emb  # noqa: E402

import float64_oracle as oracle  # noqa: E402
from ternpool.engine import model as ours_model  # noqa: E402
from ternpool.engine.config import ModelConfig  # noqa: E402
from ternpool.engine.modelgen import SHAPES, make_model  # noqa: E402
from ternpool.engine.tokenizer import Tokenizer  # noqa: E402
from ternpool.engine.weights import load_weights  # noqa: E402
from ternpool.kernels import attention_ref, bf16_matmul_ref, bf16_to_f32, ternary_matmul  # noqa: E402

f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


# -- our steps in float64, for the swap table ---------------------------------------------------------

def rms_norm64(x, weight, eps):
    x = np.asarray(x, np.float64)
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _normed(x, norm, eps, gate):
    """What a linear reads (engine.model.Quantized's input): relu(gate)**2 * x if gated, normed by the model
    module's `rms_norm` as it stands (ours, or rms_norm64 when that step is swapped) unless norm is None."""
    if gate is not None:
        x = np.square(np.maximum(gate, 0)) * x
    return x if norm is None else ours_model.rms_norm(x, norm, eps)


class Quantized64:
    """`engine.model.Quantized` in float64: scale and rounding in float64, the integer product exact."""

    def __init__(self, x, norm=None, eps=0.0, gate=None):
        x = np.asarray(_normed(x, norm, eps, gate), np.float64)
        self.s = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
        self.q = np.clip(np.rint(x * self.s), -128, 127).astype(np.int8)

    def __call__(self, *lins):
        outs = [self._one(lin) for lin in lins]
        return outs[0] if len(outs) == 1 else outs

    def _one(self, lin):
        acc = ternary_matmul(lin.packed, self.q).astype(np.float64)
        return acc / (self.s * lin.weight_scale) if lin.divides else acc / self.s * lin.weight_scale


class NormThenQuantize(ours_model.Quantized):
    """Our quantization of an input normed apart (by the module's `rms_norm`): how the rms_norm swap reaches
    the norms that ours fuses with the quantization."""

    def __init__(self, x, norm=None, eps=0.0, gate=None):
        super().__init__(f32(_normed(x, norm, eps, gate)))


def rope64(model):
    cfg = model.config
    inv_freq = 1.0 / float(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = np.arange(model.max_context)[:, None] * inv_freq[None, :]
    model.cos, model.sin = np.cos(angles), np.sin(angles)


SWAPS = {  # name -> what it replaces in engine/model.py (module attributes), or a model edit
    "rms_norm": {"rms_norm": rms_norm64, "Quantized": NormThenQuantize},
    "activation quantization + dequantization": {"Quantized": Quantized64},
    "rotary tables (exact angles)": rope64,
    "attention (scores, softmax, sum)": {"attention": attention_ref},
    "output head": {"bf16_matmul": lambda w, h: bf16_matmul_ref(w, h).astype(np.float64)},
}


@contextlib.contextmanager
def swapped(names: dict):
    saved = {k: getattr(ours_model, k) for k in names}
    for k, v in names.items():
        setattr(ours_model, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ours_model, k, v)


def ours_logits(weights, ids, swaps=(), head="bf16") -> np.ndarray:
    model = ours_model.BitNetModel(weights, slots=1, max_context=len(ids) + 1, head=head)
    names = {}
    for s in swaps:
        if callable(SWAPS[s]):
            SWAPS[s](model)
        else:
            names.update(SWAPS[s])
    n = len(ids)
    with swapped(names):
        return model.forward(np.array(ids), np.arange(n), np.zeros(n, int)).astype(np.float64)


# -- step by step ---------------------------------------------------------------------------------------

def record_steps(model, ids) -> dict:
    """(layer, step) -> (inputs, output) of the float64 reference, as float64 arrays (positions first)."""
    rec, hooks = {}, []

    def keep(key):
        def hook(module, inputs, output):
            rec[key] = (inputs[0][0].double().numpy(), output[0].double().numpy())
        return hook

    for li, layer in enumerate(model.model.layers):
        for name in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.attn_sub_norm", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.ffn_sub_norm", "mlp.down_proj"):
            hooks.append(layer.get_submodule(name).register_forward_hook(keep((li, name))))
    hooks.append(model.model.norm.register_forward_hook(keep((None, "model.norm"))))
    hooks.append(model.lm_head.register_forward_hook(keep((None, "lm_head"))))
    oracle.logits(model, ids, float64=True)
    for h in hooks:
        h.remove()
    return rec


def step_errors(weights, m32, m64, ids) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(step, ours' relative errors, transformers fp32's) for every step of every layer."""
    rec = record_steps(m64, ids)
    cfg, n = weights.config, len(ids)
    D = cfg.head_dim
    model = ours_model.BitNetModel(weights, slots=1, max_context=n + 1, head="bf16")
    pos, slots = np.arange(n), np.zeros(n, int)
    cos, sin = m32.model.rotary_emb(torch.zeros(1), torch.arange(n)[None])
    out = {}

    def add(step, ref, ours, theirs):
        rms = np.sqrt(np.mean(ref ** 2))
        for who, got in (("ours", ours), ("fp32", theirs)):
            out.setdefault((step, who), []).append(np.abs(np.asarray(got, np.float64).reshape(ref.shape) - ref) / rms)

    def torch_step(module, x):
        with torch.no_grad():
            return module(torch.tensor(f32(x))[None])[0].numpy()

    for li, layer in enumerate(weights.layers):
        hl = m32.model.layers[li]
        norms = (("input_layernorm", layer.input_norm), ("self_attn.attn_sub_norm", layer.attn_sub_norm),
                 ("post_attention_layernorm", layer.post_attention_norm), ("mlp.ffn_sub_norm", layer.ffn_sub_norm))
        for name, w in norms:
            x, ref = rec[(li, name)]
            add("rms_norm", ref, ours_model.rms_norm(f32(x), w, cfg.rms_norm_eps), torch_step(hl.get_submodule(name), x))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            full = f"{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}"
            x, ref = rec[(li, full)]
            add("quantize + ternary linear", ref, ours_model.Quantized(f32(x))(getattr(layer, name)),
                torch_step(hl.get_submodule(full), x))
        q, k, v = (f32(rec[(li, f"self_attn.{p}_proj")][1]).reshape(n, -1, D) for p in "qkv")
        ref = rec[(li, "self_attn.attn_sub_norm")][0]
        kc, vc = model.k_cache[li], model.v_cache[li]
        kc[slots, :, pos, :] = ours_model.apply_rope(k, model.cos[pos], model.sin[pos])
        vc[slots, :, pos, :] = v
        mine = ours_model.attention(ours_model.apply_rope(q, model.cos[pos], model.sin[pos]), kc, vc, slots, pos,
                                    model.scale)
        qt, kt, vt = (torch.tensor(t).transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, n, D)
        qt, kt = apply_rotary_pos_emb(qt, kt, cos, sin)
        with torch.no_grad():
            theirs = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=D ** -0.5, enable_gqa=True)
        add("rotary + attention", ref, mine, theirs[0].transpose(0, 1).numpy())
        g, u = rec[(li, "mlp.gate_proj")][1], rec[(li, "mlp.up_proj")][1]
        ref = rec[(li, "mlp.ffn_sub_norm")][0]
        g32, u32 = f32(g), f32(u)
        with torch.no_grad():
            theirs = (hl.mlp.act_fn(torch.tensor(g32)) * torch.tensor(u32)).numpy()
        add("relu(gate)^2 * up", ref, np.square(np.maximum(g32, np.float32(0))) * u32, theirs)
    x, ref = rec[(None, "model.norm")]
    add("rms_norm", ref, ours_model.rms_norm(f32(x), weights.norm, cfg.rms_norm_eps), torch_step(m32.model.norm, x))
    x, ref = rec[(None, "lm_head")]
    add("output head (bf16 weights)", ref, model.logits(f32(x), "bf16"), torch_step(m32.lm_head, x))
    add("output head (int8 head)", ref, model.logits(f32(x), "int8"), torch_step(m32.lm_head, x))
    steps = dict.fromkeys(step for step, _ in out)
    return [(s, np.concatenate([e.ravel() for e in out[(s, "ours")]]),
             np.concatenate([e.ravel() for e in out[(s, "fp32")]])) for s in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: a 2-layer model of the 2b4t width, made here)")
    ap.add_argument("--vocab", type=int, default=SHAPES["2b4t"].vocab_size, help="vocabulary of the made model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="1,100,350", help="prompt lengths in tokens")
    args = ap.parse_args()
    path = args.model
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="noise-")) / "model"
        make_model(path, replace(SHAPES["2b4t"], num_hidden_layers=2, vocab_size=args.vocab), seed=args.seed)
    cfg = ModelConfig.from_dir(path)
    tok, weights = Tokenizer(path), load_weights(path, cfg)
    m32 = oracle.load(path, torch.float32)
    m64 = oracle.load(path, torch.float64)
    print(f"model {path}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}")
    for n in (int(s) for s in args.lengths.split(",")):
        ids = oracle.prompt_ids(tok, cfg.bos_token_id, n)
        ref, double = oracle.logits(m64, ids, float64=True), oracle.logits(m64, ids)
        ours, fp32 = ours_logits(weights, ids), oracle.logits(m32, ids)
        print(f"\n== {n} tokens: end to end (top-1 agreement / median |logit error|; logit spread {ref.std():.2f})")
        print(f"{'':28s} {'vs float64':>16s} {'vs model.double()':>20s}")
        rows = (("ours (bf16 head)", ours), ("ours, int8 head", ours_logits(weights, ids, head="int8")),
                ("transformers fp32", fp32), ("transformers model.double()", double))
        for who, got in rows:
            a, b = oracle.noise(got, ref), oracle.noise(got, double)
            print(f"{who:28s} {a[0]:7.3f} {a[1]:8.4f} {b[0]:11.3f} {b[1]:8.4f}")
        if n == 1:
            continue
        print(f"-- {n} tokens: each step on the float64 reference's input (error / RMS of the output)")
        print(f"{'step':42s} {'ours median':>12s} {'ours max':>9s} {'fp32 median':>12s} {'fp32 max':>9s}")
        for step, mine, theirs in step_errors(weights, m32, m64, ids):
            print(f"{step:42s} {np.median(mine):12.2e} {mine.max():9.2e} {np.median(theirs):12.2e} {theirs.max():9.2e}")
        print(f"-- {n} tokens: ours with one step in float64, end to end against float64")
        for swaps in ((), *((s,) for s in SWAPS), tuple(SWAPS)):
            top1, med = oracle.noise(ours_logits(weights, ids, swaps), ref)
            print(f"{' + '.join(swaps) or 'none (ours as shipped)':60s} {top1:7.3f} {med:8.4f}")


if __name__ == "__main__":
    main()
