"""Workers with faults, for the fault tests: `submit(..., worker_cls=faulty(...))` starts them in place
of the shipped `Worker`, which has no fault code paths of its own.

Ray creates the actors in other processes, which cannot import this test module: it is registered to be
pickled by value, so its classes travel with the actor definition.
"""

from __future__ import annotations

import os
import sys
import time

import ray.cloudpickle

from ternpool.cluster.worker import Worker


class FaultyWorker(Worker):
    """A `Worker` that exits (a crash: the process dies mid-shard) on a row whose prompt is
    `exit_on_prompt`, hangs forever on one whose prompt is `hang_on_prompt`, and sleeps `step_delay`
    seconds after every engine step (a slow node). Set by `faulty`."""

    exit_on_prompt: str | None = None
    hang_on_prompt: str | None = None
    step_delay: float = 0.0

    def _beat(self, _tokens: int = 0) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)
        super()._beat(_tokens)

    def _source(self):
        for req in super()._source():
            if req is not None:  # a row the engine is about to take
                if self.exit_on_prompt is not None and req.prompt == self.exit_on_prompt:
                    os._exit(1)
                if self.hang_on_prompt is not None and req.prompt == self.hang_on_prompt:
                    while True:
                        time.sleep(3600)
            yield req


def faulty(exit_on_prompt: str | None = None, hang_on_prompt: str | None = None,
           step_delay: float = 0.0) -> type[Worker]:
    """A `FaultyWorker` class with these faults, for `submit(..., worker_cls=...)`."""
    return type("FaultyWorker", (FaultyWorker,), {"exit_on_prompt": exit_on_prompt,
                                                  "hang_on_prompt": hang_on_prompt, "step_delay": step_delay})


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
