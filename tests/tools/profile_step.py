"""Where one forward step's time goes: cProfile around BitNetModel.forward (decode of N sequences, or prefill).

    python tests/tools/profile_step.py MODEL_DIR --sequences 32 [--head int8] [--weights-format 2bit]
    python tests/tools/profile_step.py MODEL_DIR --prefill 128
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np

from ternpool.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--sequences", type=int, default=32, help="decoding sequences, each with a 128-token context")
    p.add_argument("--prefill", type=int, help="profile a prefill of this many tokens instead")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--head", default="int8")
    p.add_argument("--weights-format", default=None)
    p.add_argument("--kv-cache", default="f32")
    args = p.parse_args()
    n = args.sequences
    e = Engine.load(args.model, threads=args.threads, slots=max(n, 1), max_context=max(256, (args.prefill or 0) + 1),
                    head=args.head, weights_format=args.weights_format, kv_cache=args.kv_cache)
    m, rng = e.model, np.random.default_rng(0)
    top = min(1000, e.config.vocab_size)
    if args.prefill:
        k = args.prefill
        step = lambda i: m.forward(rng.integers(0, top, k), np.arange(k), np.zeros(k, np.int64), [k - 1])  # noqa: E731
    else:
        for s in range(n):  # a 128-token context in every slot
            m.forward(rng.integers(0, top, 128), np.arange(128), np.full(128, s))
        toks, slots = rng.integers(0, top, n), np.arange(n)
        step = lambda i: m.forward(toks, np.full(n, 128 + i), slots)  # noqa: E731
    step(0)
    t0 = time.perf_counter()
    for i in range(3):
        step(i)
    dt = (time.perf_counter() - t0) / 3
    print(f"one step: {dt * 1e3:.1f} ms ({(args.prefill or n) / dt:.1f} tokens/s)")
    pr = cProfile.Profile()
    pr.enable()
    for i in range(3):
        step(i)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
