"""One layer's attention on 2b4t shapes (20 heads, 5 KV heads, 128 dims) with each KV cache dtype, side by
side in one process: the rounds alternate f32, bf16 and int8 case by case; per case the min over the rounds
of the median of a few calls, in ms.

    python tests/tools/attention_kv_ab.py [--threads 2] [--rounds 5] [--calls 9]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ternpool.kernels import attention, f32_to_bf16, set_threads
from ternpool.kernels.kv8 import quantize_kv

H, KVH, D = 20, 5, 128
CASES = {"1 sequence, context 129": (1, 129, 1), "32 sequences, context 129": (32, 129, 1),
         "64 sequences, context 129": (64, 129, 1), "prefill 128": (1, 128, 128)}
CONVERT = {"f32": lambda c: c, "bf16": f32_to_bf16, "int8": quantize_kv}


def inputs(sequences: int, context: int, tokens: int) -> dict:
    rng = np.random.default_rng(sequences * 1000 + context)
    kc, vc = (rng.standard_normal((sequences, KVH, context, D)).astype(np.float32) for _ in range(2))
    if tokens > 1:  # a prefill chunk: positions 0..tokens-1 of slot 0
        slots, pos = np.zeros(tokens, np.int64), np.arange(tokens)
    else:  # one decode token a sequence, at the end of its context
        slots, pos = np.arange(sequences), np.full(sequences, context - 1)
    q = rng.standard_normal((len(slots), H, D)).astype(np.float32)
    return {kv: (q, conv(kc), conv(vc), slots, pos) for kv, conv in CONVERT.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=9)
    args = p.parse_args()
    threads = set_threads(args.threads)
    cases = {name: inputs(*shape) for name, shape in CASES.items()}
    best = {(name, kv): float("inf") for name in cases for kv in CONVERT}
    for _ in range(args.rounds):
        for name, by_kv in cases.items():
            for kv, (q, kc, vc, slots, pos) in by_kv.items():
                attention(q, kc, vc, slots, pos, D ** -0.5)  # compiled and warm
                times = []
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    attention(q, kc, vc, slots, pos, D ** -0.5)
                    times.append(time.perf_counter() - t0)
                best[name, kv] = min(best[name, kv], float(np.median(times)))
    print(f"one layer's attention, {threads} threads, ms (min over {args.rounds} rounds of the median of "
          f"{args.calls} calls): " + " / ".join(CONVERT))
    for name in cases:
        print(f"{name}: " + " / ".join(f"{best[name, kv] * 1e3:.3f}" for kv in CONVERT))


if __name__ == "__main__":
    main()
