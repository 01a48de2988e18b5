"""The coordinator's queue of work: pieces of shards, and the policy that isolates a failing row.

A piece is a contiguous range of one planned shard (the whole shard at first). A piece whose worker
is lost goes back to the queue: the first loss is retried as is; after that a piece with several rows
is split in halves, so a row that keeps killing its worker ends up alone and, after `max_retries` more
losses, is given up (the coordinator writes it with an error). A piece lost once is held alone: it
goes only to a worker holding nothing, and that worker gets nothing more until it is done, so a loss
is charged to the rows that may have caused it, never to an innocent piece that shared the worker.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ternpool.jobs.plan import Shard, split_shard

log = logging.getLogger(__name__)

CHOICES = 16  # queued pieces `take` offers its `choose` (cluster/affinity.py)


@dataclass
class Piece:
    shard: Shard  # a contiguous range of one planned shard (same shard_id)
    losses: int = 0  # times a worker holding it was lost

    @property
    def key(self) -> tuple[int, int]:
        return (self.shard.shard_id, self.shard.row_start)


class PieceQueue:
    """Pieces waiting for a worker, suspects (lost before) first."""

    def __init__(self, shards: Iterable[Shard], max_retries: int):
        self.max_retries = max_retries
        self._queue: deque[Piece] = deque(Piece(s) for s in shards)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Piece]:
        return iter(self._queue)

    def clear(self) -> None:
        self._queue.clear()

    def take(self, held: Iterable[Piece], choose: Callable[[list[Piece]], int] | None = None) -> Piece | None:
        """The next piece for a worker holding `held`, or None when it may take nothing now. A suspect
        goes first to a worker holding nothing; otherwise `choose` (default: the first) picks among the
        queued pieces that are not suspects, given in queue order."""
        held = list(held)
        if not self._queue or any(p.losses for p in held):
            return None
        if not held and self._queue[0].losses:
            return self._queue.popleft()
        innocent = ([p for p in itertools.islice(self._queue, CHOICES) if not p.losses]
                    or [p for p in self._queue if not p.losses][:1])  # suspects may fill the front
        if not innocent:
            return None
        piece = innocent[choose(innocent) if choose else 0]
        del self._queue[next(i for i, p in enumerate(self._queue) if p is piece)]
        return piece

    def lost(self, piece: Piece, reason: str) -> int | None:
        """Its worker was lost: requeue it (split once it has been lost before). Returns the row index
        when the piece is one row lost more than `max_retries` + 1 times: the caller gives it up."""
        piece.losses += 1
        rows = piece.shard.num_rows
        if piece.losses > 1 and rows > 1:
            for half in split_shard(piece.shard, 2):
                self._queue.appendleft(Piece(half, losses=1))
            log.warning("shard %d rows %d..%d lost %d times (%s): split to isolate the failing row",
                        piece.shard.shard_id, piece.shard.first_row_index,
                        piece.shard.first_row_index + rows - 1, piece.losses, reason)
        elif rows == 1 and piece.losses > self.max_retries + 1:
            row = piece.shard.first_row_index
            log.error("row %d lost its worker %d times: written with an error", row, piece.losses)
            return row
        else:
            self._queue.appendleft(piece)
        return None
