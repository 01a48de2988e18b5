"""Log-probabilities of tokens: the token's value and the most likely alternatives, from a (vocab,)
vector of log-probabilities of one of two distributions (`SamplingParams.logprobs_mode`):

- raw (vLLM's default, `raw_logprobs`): the model's own, the log_softmax of a logit row (float64,
  before temperature, top-k, top-p and any structured-output mask);
- processed (`processed_logprobs`): the one the token was drawn from. At temperature > 0 the log of
  `sampling.candidates`' probabilities (after temperature, top-k, top-p and the mask), -inf for every
  other token; at temperature 0 the log_softmax of the (masked) logits.

Computed only for the sequences that ask for them; prompt tokens are always scored raw."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .requests import TokenLogprob, TopLogprob
from .sampling import most_likely

# logit rows turned into logits at once for prompt scoring: bounds the memory of a long prefill
# chunk (512 rows x a 128256-token vocabulary in float32 would be 260 MB)
PROMPT_ROWS_PER_BLOCK = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(vocab,) logits -> (vocab,) float64 log-probabilities (-inf where a logit is -inf, as a mask
    leaves them); ValueError for NaN or +inf logits."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max()
    if not np.isfinite(top):
        raise ValueError(f"the model produced non-finite logits (max {top})")
    shifted = z - top
    return shifted - np.log(np.exp(shifted).sum())


def processed(logits: np.ndarray, drawn: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """(vocab,) float64 log-probabilities of the distribution a token was drawn from: `drawn` is what
    `sampling.draw` handed back for the (masked) `logits` row, the candidates (ids, probabilities) or
    None for a greedy pick, whose distribution is the row's log_softmax."""
    if drawn is None:
        return log_softmax(logits)
    ids, p = drawn
    out = np.full(logits.shape[0], -np.inf)
    with np.errstate(divide="ignore"):  # a candidate whose probability underflowed to 0 (or a masked one)
        out[ids] = np.log(p)
    return out


def top_ids(logprobs: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest log-probabilities, largest first; ties, in the choice and the order,
    go to smaller ids (so the -inf tokens that fill a processed list past its candidates are the
    lowest ids, whatever the numpy version)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = most_likely(logprobs, min(k, logprobs.shape[0]))
    return idx[np.lexsort((idx, -logprobs[idx]))]


def token_logprob(logprobs: np.ndarray, token_id: int, k: int, text: Callable[[int], str]) -> TokenLogprob:
    """`token_id`'s log-probability at a position whose (vocab,) log-probabilities are `logprobs`
    (`log_softmax` or `processed`), with the top `k` alternatives; `text(id)` is a token's text."""
    top = tuple(TopLogprob(int(t), text(int(t)), float(logprobs[t])) for t in top_ids(logprobs, k))
    return TokenLogprob(int(token_id), text(int(token_id)), float(logprobs[token_id]), top)
