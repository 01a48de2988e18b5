"""The KV cache's blocks: who holds each, and the prefix cache that lets prompts share them.

The model's cache is a pool of blocks of KV_BLOCK_TOKENS positions (engine/model.py); a sequence's
cache is the list of its blocks. A full block of a prompt is named by a hash of every token up to
its end (the K and V at a position depend on all tokens before it, and on nothing else for one
model), so two prompts that start with the same tokens name their first blocks alike: a sequence
admitted after the first can take those blocks instead of computing them. Blocks are counted by
reference; one nobody holds stays cached until its block is needed for something else, then the
least recently used one goes first. Only prompt blocks written whole are shared, and a block is
never written again once it is named, so sharing cannot change any result.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def prefix_hashes(tokens: list[int], block: int) -> list[bytes]:
    """The names of the full blocks of `tokens`: block i's covers tokens[: (i + 1) * block]."""
    names: list[bytes] = []
    parent = b""
    ids = np.asarray(tokens, dtype="<i8")
    for i in range(len(tokens) // block):
        parent = hashlib.blake2b(parent + ids[i * block:(i + 1) * block].tobytes(), digest_size=16).digest()
        names.append(parent)
    return names


class BlockPool:
    """Blocks 0..blocks-1: free ones, ones held by sequences (with a count), and the named ones (full
    prompt blocks) that the prefix cache can hand out again. `caching=False`: nothing is named, every
    block is freed for reuse when its holder ends."""

    def __init__(self, blocks: int, caching: bool = True):
        self.caching = caching
        self.refs = np.zeros(blocks, dtype=np.int64)
        self._fresh = list(range(blocks - 1, -1, -1))  # never named (or forgotten): handed out first
        self._idle: OrderedDict[int, None] = OrderedDict()  # named, held by nobody: least recently used first
        self._by_name: dict[bytes, int] = {}
        self._name: dict[int, bytes] = {}
        self.evictions = 0  # named blocks given up to make room

    @property
    def free(self) -> int:
        """Blocks that can be handed out now (fresh or cached but idle)."""
        return len(self._fresh) + len(self._idle)

    @property
    def cached(self) -> int:
        """Named blocks (held or idle): what the prefix cache holds."""
        return len(self._by_name)

    def allocate(self) -> int:
        """A block for a sequence to write: a fresh one, else the least recently used idle named one
        (forgotten). RuntimeError when every block is held (the engine never asks for more than its
        slots can hold)."""
        if self._fresh:
            b = self._fresh.pop()
        elif self._idle:
            b, _ = self._idle.popitem(last=False)
            del self._by_name[self._name.pop(b)]
            self.evictions += 1
        else:
            raise RuntimeError("every KV block is in use")
        self.refs[b] = 1
        return b

    def lookup(self, name: bytes) -> int | None:
        """The cached block of that name, taken (its count raised), or None."""
        b = self._by_name.get(name)
        if b is not None:
            if self.refs[b] == 0:
                del self._idle[b]
            self.refs[b] += 1
        return b

    def has(self, name: bytes) -> bool:
        return name in self._by_name

    def name(self, block: int, name: bytes) -> None:
        """`block` (held, now written whole) is the block called `name`, unless one is already cached."""
        if self.caching and name not in self._by_name and block not in self._name:
            self._by_name[name] = block
            self._name[block] = name

    def forget(self) -> None:
        """Drop every name (the blocks' contents can no longer be trusted); idle blocks become free."""
        self._fresh.extend(self._idle)
        self._idle.clear()
        self._by_name.clear()
        self._name.clear()

    def release(self, block: int) -> None:
        """A holder is done with `block`: when nobody holds it, a named block idles in the cache, any
        other is free."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._name:
                self._idle[block] = None
            else:
                self._fresh.append(block)
