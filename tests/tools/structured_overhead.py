"""Aggregate decode with every row constrained by a small JSON schema vs unconstrained (a command, not a
test): one engine, the same prompts, both runs in one process.

    python tests/tools/structured_overhead.py MODEL_DIR [--streams 32] [--gen 64] [--prompt-len 32]

Only decode steps with all `--streams` sequences in them count, so rows the grammar finishes early do not
change the concurrency being compared. The two runs alternate `--rounds` times (the first run after
loading pays first-touch costs the next ones do not; the prefix cache is off, so no run reuses another's
prompt blocks); prints tokens/s of each round and the ratio of the totals (issue 15's target: the
constrained runs within 15% of the unconstrained ones).
"""

from __future__ import annotations

import argparse
import time

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.bench import random_prompts, warm_up

# small, and long enough (a 64-character name first) that a random model keeps all streams busy for --gen tokens
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "minLength": 64}, "scores": {"type": "array",
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
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    engine = Engine.load(a.model, slots=a.streams, max_context=a.prompt_len + a.gen + 8, threads=a.threads,
                         prefix_cache=False)
    warm_up(engine, a.prompt_len)
    prompts = random_prompts(engine, a.streams, a.prompt_len, seed=1)
    run(engine, prompts[:2], 4, constrained=True)  # the tokenizer conversion and the schema compile, once
    totals = {False: [0.0, 0], True: [0.0, 0]}  # constrained -> [seconds, tokens] of full steps
    for r in range(a.rounds):
        line = []
        for constrained in (False, True):
            rate, steps = run(engine, prompts, a.gen, constrained)
            totals[constrained][0] += steps * a.streams / rate
            totals[constrained][1] += steps * a.streams
            line.append(f"{'JSON schema on every row' if constrained else 'unconstrained'} {rate:.1f} tok/s "
                        f"({steps} full steps)")
        print(f"round {r + 1}: " + ", ".join(line))
    plain, guided = (totals[c][1] / totals[c][0] for c in (False, True))
    print(f"{a.streams} streams, {a.gen} tokens each, {a.rounds} rounds: unconstrained {plain:.1f} tok/s, "
          f"constrained {guided:.1f} tok/s; ratio {guided / plain:.3f}")


if __name__ == "__main__":
    main()
