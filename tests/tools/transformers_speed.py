"""transformers' own BitNet on this machine, for the README's side-by-side (needs torch, a test dependency).

    python tests/tools/transformers_speed.py MODEL_DIR [--threads 2] [--dtype bf16]

Prints prefill tokens/s of a 128-token prompt at batch 1 and 8, and single-stream decode tokens/s.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    m.to(dtype)  # from_pretrained leaves embeddings and norms in bf16
    ids = torch.randint(0, min(100000, m.config.vocab_size), (8, 128))
    with torch.inference_mode():
        m(ids[:1, :8])  # warm up
        for b in (1, 8):
            t0 = time.perf_counter()
            m(ids[:b])
            print(f"transformers {args.dtype} prefill batch {b}: {b * 128 / (time.perf_counter() - t0):.2f} tokens/s",
                  flush=True)
        out = m(ids[:1], use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        n, t0 = 8, time.perf_counter()
        for _ in range(n):
            out = m(tok, past_key_values=cache, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        print(f"transformers {args.dtype} decode batch 1: {n / (time.perf_counter() - t0):.2f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
