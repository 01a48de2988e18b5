"""Log-probabilities of tokens under the model's raw distribution: the log_softmax of a logit row
(float64, before temperature, top-k and top-p, as vLLM reports by default), the token's value and
the most likely alternatives. Computed only for the sequences that ask for them."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .requests import TokenLogprob, TopLogprob

# logit rows turned into logits at once for prompt scoring: bounds the memory of a long prefill
# chunk (512 rows x a 128256-token vocabulary in float32 would be 260 MB)
PROMPT_ROWS_PER_BLOCK = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(vocab,) logits -> (vocab,) float64 log-probabilities; ValueError for NaN or +inf logits."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max()
    if not np.isfinite(top):
        raise ValueError(f"the model produced non-finite logits (max {top})")
    shifted = z - top
    return shifted - np.log(np.exp(shifted).sum())


def top_ids(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest log-probabilities, largest first (ties: smaller id first)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, logprobs.shape[0])
    idx = np.argpartition(-logprobs, k - 1)[:k]
    return idx[np.lexsort((idx, -logprobs[idx]))]


def token_logprob(logits: np.ndarray, token_id: int, k: int, text: Callable[[int], str]) -> TokenLogprob:
    """`token_id`'s log-probability at a position whose logits are `logits`, with the top `k`
    alternatives; `text(id)` is a token's text."""
    lp = log_softmax(logits)
    top = tuple(TopLogprob(int(t), text(int(t)), float(lp[t])) for t in top_ids(lp, k))
    return TokenLogprob(int(token_id), text(int(token_id)), float(lp[token_id]), top)
