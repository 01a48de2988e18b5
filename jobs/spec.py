"""What a batch job is: `JobSpec`, the sampling column names, and per-row seeds."""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ternpool.engine.options import TRUNCATE_MODES
from ternpool.engine.guided import constraint_problem
from ternpool.engine.requests import CONSTRAINT_FIELDS, SamplingParams

# per-row columns that override the job's sampling defaults: SamplingParams' fields
SAMPLING_COLUMNS = tuple(f.name for f in fields(SamplingParams))

_SEED_LIMIT = 2 ** 63
OUTPUT_FORMATS = ("parquet", "openai")


@dataclass(frozen=True)
class JobSpec:
    """One batch job: where the prompts are, where the output goes, which model, and the
    sampling defaults (`sampling`) that per-row columns override.

    `sampling.seed` is the job seed: a row without a `seed` gets derive_seed(seed, row_index);
    None means 0."""

    inputs: str  # a Parquet file, a directory, a glob, or a URI pyarrow.fs opens
    output: str  # output directory (local path or URI)
    model: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    shard_rows: int = 64  # max rows per shard
    max_retries: int = 3
    truncate: str = "error"  # "error": a too-long prompt is an error row; "left": keep its end
    input_format: str | None = None  # a registered input format's name; None: detected per file
    output_format: str = "parquet"  # "openai": also OUT/output.jsonl + errors.jsonl (always for OpenAI inputs)

    def __post_init__(self):
        for name in ("inputs", "output", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"JobSpec.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.sampling, SamplingParams):
            raise ValueError(f"JobSpec.sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        if self.sampling.seed is None:
            object.__setattr__(self, "sampling", replace(self.sampling, seed=0))
        if isinstance(self.shard_rows, bool) or not isinstance(self.shard_rows, int) \
                or self.shard_rows < 1:
            raise ValueError(f"JobSpec.shard_rows must be an integer >= 1, got {self.shard_rows!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) \
                or self.max_retries < 0:
            raise ValueError(f"JobSpec.max_retries must be an integer >= 0, "
                             f"got {self.max_retries!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"JobSpec.output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        problem = constraint_problem(self.sampling)
        if problem:  # a job-wide schema or regex that cannot compile: refused before any compute
            raise ValueError(f"JobSpec.sampling: {problem}")
        if self.truncate not in TRUNCATE_MODES:
            raise ValueError(f"JobSpec.truncate must be one of {TRUNCATE_MODES}, "
                             f"got {self.truncate!r}")

    def sampling_defaults(self) -> dict[str, Any]:
        """The job's sampling defaults as a JSON-able dict (recorded in the manifest: part of the
        job's identity, so its keys and value types stay as they are)."""
        s = self.sampling
        out = {"max_tokens": s.max_tokens, "temperature": float(s.temperature), "top_p": float(s.top_p),
               "top_k": s.top_k, "seed": s.seed, "stop": list(s.stop)}
        # logprob defaults only when asked for: a manifest written before they existed stays this job's
        if s.logprobs:
            out.update(logprobs=True, top_logprobs=s.top_logprobs)
        if s.prompt_logprobs is not None:
            out["prompt_logprobs"] = s.prompt_logprobs
        if s.logprobs_mode != "raw":  # likewise only when not the default: it changes the logprob columns
            out["logprobs_mode"] = s.logprobs_mode
        for name in CONSTRAINT_FIELDS:  # structured output, likewise only when asked for
            value = getattr(s, name)
            if value is not None:
                out[name] = list(value) if name == "guided_choice" else value
        return out


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
