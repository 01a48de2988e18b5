"""Prefix-aware leasing: hand a worker the shards whose prompts start like those it already holds.

A worker's prefix cache (engine/blocks.py) only helps rows whose prompts begin with blocks it has
computed. Jobs repeat a few long instructions; when the rows of one instruction sit together in the
input (or the shards of each are interleaved), sending each instruction's shards to the worker that
has it cached saves every other worker computing it again, and keeps the caches from evicting each
other's instructions when there are more of them than one cache holds.

A shard's signature is the most common start of its rows' prompts (the first SIGNATURE_CHARS
characters of the text, or of a chat's messages in order), read once from the rows the coordinator
reads to lease the shard anyway. When a worker asks for work, the coordinator looks at the next
pieces of its queue (`pieces.CHOICES`, suspects of a lost worker aside) and takes, in order of
preference: the first whose signature the worker has been leased before; the first whose signature
no other worker has; the first. Only which queued piece goes next changes: exactly-once, retries and the isolation of suspect pieces (cluster/pieces.py)
are the queue's as before.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

SIGNATURE_CHARS = 256  # a prompt's start that names its instruction (16 blocks of ~4 characters a token)
REMEMBERED = 64  # signatures remembered per worker (most recent), about what a cache of 2b4t's default size holds


def row_signature(prompt) -> str | None:
    """The start of a row's prompt text: a string, or a chat's messages' contents in order."""
    if isinstance(prompt, str):
        return prompt[:SIGNATURE_CHARS]
    if isinstance(prompt, (list, tuple)):
        text = "".join(f"{m.get('role')}\x1f{m.get('content')}\x1e" if isinstance(m, dict) else str(m) for m in prompt)
        return text[:SIGNATURE_CHARS]
    return None


def shard_signature(prompts: Sequence) -> str | None:
    """The most common signature of a shard's rows (the first of the most common on a tie); None when
    no row has one."""
    counts = Counter(s for s in map(row_signature, prompts) if s is not None)
    return max(counts, key=counts.get) if counts else None


class Affinity:
    """Which signatures each worker has been leased, and the choice of the next piece for a worker."""

    def __init__(self, signature: Callable[[object], str | None]):
        self._signature = signature  # piece -> its shard's signature (the coordinator reads and caches it)
        self._held: dict[str, OrderedDict] = {}  # worker -> its signatures, most recent last

    def choose(self, worker: str, pieces: Sequence) -> int:
        """Index into `pieces` (the next queued pieces a worker may take) of the one to lease."""
        mine = self._held.get(worker, {})
        others = set().union(*(h for w, h in self._held.items() if w != worker))
        fresh = None
        for i, piece in enumerate(pieces):
            sig = self._signature(piece)
            if sig is None:
                continue
            if sig in mine:
                return i
            if fresh is None and sig not in others:
                fresh = i
        return fresh if fresh is not None else 0

    def leased(self, worker: str, piece) -> None:
        sig = self._signature(piece)
        if sig is None:
            return
        held = self._held.setdefault(worker, OrderedDict())
        held[sig] = None
        held.move_to_end(sig)
        while len(held) > REMEMBERED:
            held.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A lost worker's cache went with it."""
        self._held.pop(worker, None)
