"""What one generated token's logprobs cost on top of its draw, raw against processed (a command, not a
test): one (vocab,) logit row at a time, as the engine handles a sequence that asks for them.

    python tests/tools/logprobs_cost.py [MODEL_DIR] [--rows 32] [--repeats 20] [--top 5]

With MODEL_DIR the rows are the model's own next-token logits after random prompts (its vocabulary and
the shape of its distributions, which decide how many tokens top-p keeps); without, random rows of
Llama 3's 128256 tokens. For each sampling setting prints the milliseconds per row of the draw alone
(`sampling.draw`) and what `--top` alternatives add in each mode: raw (`log_softmax` of the row, then
`token_logprob`) and processed (`logprobs.processed` from the draw's candidates, then `token_logprob`).
Token texts are left out (the same tokenizer calls in both modes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ternpool.engine import SamplingParams
from ternpool.engine.logprobs import log_softmax, processed, token_logprob
from ternpool.engine.sampling import draw, make_rng

VOCAB = 128256  # Llama 3's, as the 2b4t model has
SETTINGS = {
    "greedy": SamplingParams(),
    "T=0.8 top_p=0.95": SamplingParams(temperature=0.8, top_p=0.95),
    "T=0.7 top_k=50": SamplingParams(temperature=0.7, top_k=50),
    "T=1.0 (no cut)": SamplingParams(temperature=1.0),
}


def model_rows(model: str, n: int) -> np.ndarray:
    from ternpool.engine import Engine
    from ternpool.engine.bench import random_prompts

    engine = Engine.load(model, slots=1, max_context=64, prefix_cache=False)
    rows = []
    for prompt in random_prompts(engine, n, 16, seed=1):
        logits = engine.model.forward(np.array(prompt), np.arange(len(prompt)), np.zeros(len(prompt), int))
        rows.append(logits[-1])
    return np.stack(rows).astype(np.float32)  # (n, vocab)


def per_row_ms(fn, rows: np.ndarray, repeats: int) -> float:
    """The median over `repeats` of the mean milliseconds `fn(row, i)` takes over all rows."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i, row in enumerate(rows):
            fn(row, i)
        times.append((time.perf_counter() - start) / len(rows) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    if a.model:
        rows = model_rows(a.model, a.rows)
    else:  # a peaked head and a long flat tail, roughly a language model's
        rng = np.random.default_rng(0)
        rows = (rng.standard_normal((a.rows, VOCAB)) * 2.0 + rng.gumbel(size=(a.rows, VOCAB)) * 1.5).astype(np.float32)
    text = str
    print(f"{rows.shape[1]} tokens, {rows.shape[0]} rows, top {a.top} alternatives; ms per row")
    print(f"{'setting':<18} {'draw':>7} {'+raw':>7} {'+processed':>11} {'candidates':>11}")
    for name, params in SETTINGS.items():
        drawn = [draw(row, params, make_rng(i)) for i, row in enumerate(rows)]
        kept = np.mean([rows.shape[1] if d is None else len(d[0]) for _, d in drawn])
        base = per_row_ms(lambda row, i: draw(row, params, make_rng(i)), rows, a.repeats)
        raw = per_row_ms(lambda row, i: token_logprob(log_softmax(row), drawn[i][0], a.top, text), rows, a.repeats)
        proc = per_row_ms(lambda row, i: token_logprob(processed(row, drawn[i][1]), drawn[i][0], a.top, text),
                          rows, a.repeats)
        print(f"{name:<18} {base:7.3f} {raw:7.3f} {proc:11.3f} {kept:11.0f}")


if __name__ == "__main__":
    main()
