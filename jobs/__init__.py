"""ternpool.jobs: job spec, input formats (`formats`) and validation, sharding, output writing,
manifest and resume. Knows files, not Ray (never imports it)."""

from .errors import JobInputError
from .inputs import InputFile, InputSet, open_inputs
from .manifest import FORMAT_VERSION, Manifest, model_fingerprint
from .output import OUTPUT_COLUMNS, error_results, part_name, read_output, result_table, write_part
from .plan import Shard, plan_shards, split_shard
from .progress import (cancel_requested, clear_cancel, read_progress, request_cancel, status,
                       write_progress)
from .rows import RowRequest, read_shard, to_requests
from .spec import SAMPLING_COLUMNS, JobSpec, derive_seed

__all__ = [
    "FORMAT_VERSION", "OUTPUT_COLUMNS", "SAMPLING_COLUMNS", "InputFile", "InputSet",
    "JobInputError", "JobSpec", "Manifest", "RowRequest", "Shard", "cancel_requested",
    "clear_cancel", "derive_seed", "error_results", "model_fingerprint", "open_inputs",
    "part_name", "plan_shards", "read_output", "read_progress", "read_shard", "request_cancel",
    "result_table", "split_shard", "status", "to_requests", "write_part", "write_progress",
]
