"""Aggregate decode with every row constrained by a small JSON schema vs unconstrained (a command, not a
test): one engine, the same prompts, both runs in one process.

    python tests/tools/structured_overhead.py MODEL_DIR [--streams 32] [--gen 64] [--prompt-len 32]

Only decode steps with all `--streams` sequences in them count, so rows the grammar finishes early do not
change the concurrency being compared. Prints tokens/s of each and their ratio (issue 15's target: the
constrained run within 15% of the unconstrained one).
"""

from __future__ import annotations

import argparse
import time

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.bench import random_prompts, warm_up

# small, and open-ended enough that a random model keeps all streams busy for --gen tokens
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "scores": {"type": "array",
          "items": {"type": "integer"}}}, "required": ["name", "scores"], "additionalProperties": False}


def run(engine: Engine, prompts, gen: int, constrained: bool) -> tuple[float, int]:
    fmt = {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA}} if constrained else None
    reqs = [Request(i, prompt_token_ids=p, params=SamplingParams(max_tokens=gen, temperature=0.8, seed=i,
                                                                 response_format=fmt))
            for i, p in enumerate(prompts)]
    steps, last = [], [time.perf_counter()]

    def on_step(tokens: int) -> None:
        now = time.perf_counter()
        steps.append((now - last[0], tokens))
        last[0] = now

    results = list(engine.stream(reqs, on_step=on_step))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    full = [dt for dt, k in steps if k == len(prompts)]  # decode steps with every stream in them
    return len(full) * len(prompts) / sum(full), len(full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    engine = Engine.load(a.model, slots=a.streams, max_context=a.prompt_len + a.gen + 8, threads=a.threads)
    warm_up(engine, a.prompt_len)
    prompts = random_prompts(engine, a.streams, a.prompt_len, seed=1)
    run(engine, prompts[:2], 4, constrained=True)  # the tokenizer conversion and the schema compile, once
    plain, n_plain = run(engine, prompts, a.gen, constrained=False)
    guided, n_guided = run(engine, prompts, a.gen, constrained=True)
    print(f"{a.streams} streams, {a.gen} tokens each: unconstrained {plain:.1f} tok/s ({n_plain} full steps), "
          f"JSON schema on every row {guided:.1f} tok/s ({n_guided} full steps); ratio {guided / plain:.3f}")


if __name__ == "__main__":
    main()
