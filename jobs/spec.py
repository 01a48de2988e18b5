"""What a batch job is: `JobSpec`, the output and sampling column names, and per-row seeds."""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass
from typing import Any

from ternpool.engine.requests import SamplingParams

OUTPUT_COLUMNS = ("row_index", "generated_text", "finish_reason", "prompt_tokens",
                  "completion_tokens", "error")
SAMPLING_COLUMNS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
TRUNCATE_MODES = ("error", "left")

_SEED_LIMIT = 2 ** 63


@dataclass(frozen=True)
class JobSpec:
    """One batch job: where the prompts are, where the output goes, which model, and the
    sampling defaults that per-row columns override."""

    inputs: str  # a Parquet file, a directory, a glob, or a URI pyarrow.fs opens
    output: str  # output directory (local path or URI)
    model: str
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # job seed; a row without `seed` gets derive_seed(seed, row_index)
    stop: tuple[str, ...] = ()
    shard_rows: int = 64  # max rows per shard
    max_retries: int = 3
    truncate: str = "error"  # "error": a too-long prompt is an error row; "left": keep its end

    def __post_init__(self):
        for name in ("inputs", "output", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"JobSpec.{name} must be a non-empty string, got {value!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        if isinstance(self.shard_rows, bool) or not isinstance(self.shard_rows, int) \
                or self.shard_rows < 1:
            raise ValueError(f"JobSpec.shard_rows must be an integer >= 1, got {self.shard_rows!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise ValueError(f"JobSpec.max_retries must be an integer >= 0, "
                             f"got {self.max_retries!r}")
        if self.truncate not in TRUNCATE_MODES:
            raise ValueError(f"JobSpec.truncate must be one of {TRUNCATE_MODES}, "
                             f"got {self.truncate!r}")
        if self.seed is None:
            raise ValueError("JobSpec.seed must be a non-negative integer, got None")
        try:
            SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                           top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop)
        except ValueError as exc:
            raise ValueError(f"JobSpec sampling default: {exc}") from None

    def sampling_defaults(self) -> dict[str, Any]:
        """The job's sampling defaults as a JSON-able dict (recorded in the manifest)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
        }


def derive_seed(job_seed: int, row_index: int) -> int:
    """The seed of a row that has none: a hash of (job seed, row_index), so retries and resumes
    reproduce the same text in any process. Non-negative and below 2**63."""
    checked = []
    for name, value in (("job_seed", job_seed), ("row_index", row_index)):
        try:
            number = operator.index(value) if not isinstance(value, bool) else -1
        except TypeError:
            number = -1
        if number < 0:
            raise ValueError(f"derive_seed: {name} must be a non-negative integer, got {value!r}")
        checked.append(number)
    job_seed, row_index = checked
    digest = hashlib.blake2b(f"{job_seed}:{row_index}".encode("ascii"), digest_size=8,
                             person=b"ternpool-seed").digest()
    return int.from_bytes(digest, "little") % _SEED_LIMIT
