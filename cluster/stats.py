"""A job's counts, typed: what the coordinator reports while the job runs (`JobStats`, per worker
`WorkerStats`, its own time `SchedulingStats`) and what the driver returns at the end (`JobSummary`).

Also the two definitions every report shares: which tokens count (`processed_tokens`) and a job's
tokens/s (`tokens_per_s`). No Ray: the driver, the CLI and tests read these without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .cost import JobCost


def processed_tokens(results) -> tuple[int, int, int]:
    """(prompt, generated, cached) tokens of the rows that succeeded; cached: the prompt tokens whose
    keys and values came from the worker's prefix cache, the prefill it saved. A failed row (too long,
    bad sampling values, ...) keeps its `prompt_tokens` in the output but was not processed: the
    counters, metrics, summary and tokens/s leave it out."""
    prompt = generated = cached = 0
    for r in results:
        if r.error is None and r.finish_reason != "error":
            prompt += r.prompt_tokens
            generated += r.completion_tokens
            cached += r.cached_tokens
    return prompt, generated, cached


def cache_share(cached_tokens: int, prompt_tokens: int) -> str:
    """'1200 of 1300 prompt tokens from the prefix cache (92.3%)', the words every report uses."""
    share = f" ({100 * cached_tokens / prompt_tokens:.1f}%)" if prompt_tokens else ""
    return f"{cached_tokens} of {prompt_tokens} prompt tokens from the prefix cache{share}"


def tokens_per_s(generated_tokens: int, processing_s: float) -> float:
    """The one definition of a job's tokens/s (progress bar, status, summary): tokens generated in this
    run / seconds from this run's first lease to its last shard written (to now while none is)."""
    return generated_tokens / processing_s if processing_s > 0 else 0.0


@dataclass(frozen=True)
class WorkerStats:
    """One worker of this run, alive or lost."""

    node: str
    rows: int = 0
    prompt_tokens: int = 0  # of the rows that succeeded
    generated_tokens: int = 0
    leased: int = 0  # pieces it holds now
    lost: bool = False
    lease_wait_s: float = 0.0  # its engine stood still waiting on the coordinator: in lease calls,
    idle_s: float = 0.0  # and with nothing to run (the worker's own running totals)
    alive_s: float = 0.0  # registration to now (to its last sign of life when lost)
    core_s: float = 0.0  # its process's CPU seconds since its warm-up (the worker's running total)
    cached_tokens: int = 0  # of its prompt_tokens, those its prefix cache held (prefill saved)


@dataclass(frozen=True)
class SchedulingStats:
    """The coordinator's own time in this run, for `ternpool bench cluster` and the busy-seconds metric."""

    lease_s: float = 0.0  # in lease(): picking a piece and reading its rows
    complete_s: float = 0.0  # in complete(): taking results, writing part files and the manifest
    write_s: float = 0.0  # of which writing part files and the manifest
    shards_written: int = 0
    shard_s: float = 0.0  # summed over written shards: first lease to part file
    pieces_leased: int = 0


@dataclass(frozen=True)
class JobStats:
    """`Coordinator.stats()`: progress and counts of a running job. Rows and failed rows are the whole
    job's (a resumed job includes earlier runs' shards); `prompt_tokens`, `generated_tokens` and
    tokens/s are this run's, `job_*_tokens` the whole job's. `to_dict()` is what OUT/_progress.json
    holds (with state, updated and metrics_port), which `ternpool status` reads."""

    job_id: str
    rows_total: int
    rows_done: int
    rows_done_this_run: int
    failed_rows: int
    shards_total: int
    shards_done: int
    queued: int  # pieces waiting for a worker
    in_flight: int  # pieces leased to workers
    retries: int  # pieces requeued after their worker was lost
    prompt_tokens: int  # this run's
    generated_tokens: int
    job_prompt_tokens: int  # the whole job's
    job_generated_tokens: int
    eta_s: float | None  # remaining rows / recent row rate; None until known
    elapsed_s: float  # since the coordinator started
    processing_s: float  # this run: first piece leased to last shard written (to now while none is)
    done: bool  # every shard written and recorded in a saved manifest
    error: str | None  # set when the job failed (a write kept failing)
    cancelled: bool
    active_workers: int
    scheduling: SchedulingStats = field(default_factory=SchedulingStats)
    workers: dict[str, WorkerStats] = field(default_factory=dict)  # this run's, lost ones included
    node_price: float | None = None  # dollars per node-hour (`--node-price`), None: no dollar figures
    cached_tokens: int = 0  # this run's prompt tokens that came from the workers' prefix caches
    job_cached_tokens: int = 0  # the whole job's

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_s(self.generated_tokens, self.processing_s)

    @property
    def cost(self) -> JobCost:
        """This run's: its workers' CPU seconds, and the nodes they ran on for its processing time."""
        nodes = len({w.node for w in self.workers.values()})
        return JobCost(sum(w.core_s for w in self.workers.values()), nodes * self.processing_s,
                       self.prompt_tokens, self.generated_tokens, self.node_price)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, nested dataclasses as dicts, `tokens_per_s` and `cost` included."""
        return dict(asdict(self), tokens_per_s=self.tokens_per_s, cost=self.cost.to_dict())

    @classmethod
    def from_manifest(cls, manifest) -> JobStats:
        """What a job's manifest alone tells, when its coordinator is gone: the rows, failed rows and
        tokens of the completed shards. This run's own counts are unknown: its tokens are 0 and all rows
        count as this run's (a summary then shows no resume split)."""
        done = manifest.completed.values()
        rows = sum(v["rows"] for v in done)
        return cls(manifest.job_id, manifest.num_rows, rows, rows, sum(v.get("failed_rows", 0) for v in done),
                   manifest.num_shards, len(manifest.completed), queued=0, in_flight=0, retries=0,
                   prompt_tokens=0, generated_tokens=0,
                   job_prompt_tokens=sum(v.get("prompt_tokens", 0) for v in done),
                   job_generated_tokens=sum(v.get("generated_tokens", 0) for v in done),
                   job_cached_tokens=sum(v.get("cached_tokens", 0) for v in done),
                   eta_s=None, elapsed_s=0.0, processing_s=0.0, done=len(manifest.completed) == manifest.num_shards,
                   error=None, cancelled=False, active_workers=0)


@dataclass(frozen=True)
class JobSummary:
    """The end of a job. rows, failed_rows and the token counts are the whole job's (a resumed job adds
    the earlier runs' shards, from the manifest); the `*_this_run` fields and tokens/s are this run's.
    Tokens are those of rows without an error."""

    output: str
    job_id: str
    state: str  # finished | cancelled | failed
    rows: int
    failed_rows: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    retries: int
    worker_restarts: int
    per_worker: dict[str, WorkerStats]
    error: str | None = None
    processing_s: float = 0.0  # this run: first shard handed out to last shard written
    scheduling: SchedulingStats = field(default_factory=SchedulingStats)  # the coordinator's own time
    rows_this_run: int = 0
    prompt_tokens_this_run: int = 0
    generated_tokens_this_run: int = 0
    cost: JobCost | None = None  # this run's (None when the coordinator was gone at the end)
    cached_tokens: int = 0  # of prompt_tokens, those taken from the workers' prefix caches (the whole job's)
    cached_tokens_this_run: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of this run / its processing time: what `status` and the progress bar show."""
        return tokens_per_s(self.generated_tokens_this_run, self.processing_s)

    @property
    def resumed(self) -> bool:
        return self.rows_this_run != self.rows


def summarize(output: str, job_id: str, state: str, stats: JobStats, wall_s: float, worker_restarts: int = 0,
              error: str | None = None) -> JobSummary:
    """A JobSummary from the coordinator's final `stats()`."""
    return JobSummary(
        output, job_id, state, stats.rows_done, stats.failed_rows, stats.job_prompt_tokens,
        stats.job_generated_tokens, wall_s, stats.retries, worker_restarts, stats.workers, error,
        stats.processing_s, stats.scheduling, stats.rows_done_this_run, stats.prompt_tokens,
        stats.generated_tokens, stats.cost if stats.workers else None, stats.job_cached_tokens, stats.cached_tokens)
