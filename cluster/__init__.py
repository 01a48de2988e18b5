"""ternpool.cluster: the Ray worker pool (coordinator, workers, driver); the command line is `cluster/cli/`.

`submit`, `PoolConfig`, `JobHandle` and `JobSummary` are imported on first use, so that the
command line does not pay for importing Ray when it does not need it. `EngineConfig` and
`SamplingParams` (from `ternpool.engine`) are here too: a job's Python call needs nothing else.
"""

__all__ = ["EngineConfig", "JobHandle", "JobSummary", "PoolConfig", "SamplingParams", "submit"]
_ENGINE = {"EngineConfig": "ternpool.engine.options", "SamplingParams": "ternpool.engine.requests"}


def __getattr__(name: str):
    if name in _ENGINE:
        from importlib import import_module

        return getattr(import_module(_ENGINE[name]), name)
    if name == "JobSummary":
        from .stats import JobSummary

        return JobSummary
    if name in __all__:
        from . import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'ternpool.cluster' has no attribute {name!r}")
