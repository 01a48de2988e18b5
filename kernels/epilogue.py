"""The store that ends the ternary kernels (`ternary.py`, `base3.py`): one kernel per layout, whose
output dtype picks what it writes.

`store(out, t, r, acc, qsum, div, mul)` writes element (t, r) from the int32 code-weighted sum `acc`
and the activation row sum `qsum` (codes are w + 1, so acc - qsum = sum(w * x)):

- int32 `out`: the exact product acc - qsum (div and mul unused, see `unused_factors`);
- float32 `out`: the dequantized (acc - qsum) / div * mul, in that order (see
  `ternary.dequant_factors`).

Numba compiles a kernel once per output dtype, each with its store inlined: no branch per element.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload


def store(out, t, r, acc, qsum, div, mul):
    """out[t, r] = acc - qsum (int32 out) or np.float32(acc - qsum) / div * mul (float32 out)."""
    if out.dtype == np.int32:
        out[t, r] = acc - qsum
    else:
        out[t, r] = np.float32(acc - qsum) / div * mul


@overload(store, inline="always")
def _store(out, t, r, acc, qsum, div, mul):
    if out.dtype == types.int32:
        def exact(out, t, r, acc, qsum, div, mul):  # pragma: no cover - compiled
            out[t, r] = acc - qsum
        return exact
    if out.dtype == types.float32:
        def dequantized(out, t, r, acc, qsum, div, mul):  # pragma: no cover - compiled
            out[t, r] = np.float32(acc - qsum) / div * mul
        return dequantized
    return None


def unused_factors(tokens: int) -> tuple[np.ndarray, np.float32]:
    """div (tokens,) and mul for a kernel writing int32, whose store ignores them."""
    return np.ones(tokens, dtype=np.float32), np.float32(1.0)
