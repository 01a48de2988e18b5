"""The one error type of the jobs layer: a job that cannot run as given."""

from __future__ import annotations


class JobInputError(ValueError):
    """A bad job: a missing or mistyped column, an unreadable, corrupt or empty file, no input
    files, an input column that collides with an output column, or an output directory that
    holds a different job. The message names the file and column (or path) at fault."""
