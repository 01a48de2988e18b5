"""ternpool.cluster: the Ray worker pool (coordinator, workers, driver); the command line is `cluster/cli/`.

`submit`, `PoolConfig`, `JobHandle` and `JobSummary` are imported on first use, so that the
command line does not pay for importing Ray when it does not need it.
"""

__all__ = ["JobHandle", "JobSummary", "PoolConfig", "submit"]


def __getattr__(name: str):
    if name == "JobSummary":
        from .stats import JobSummary

        return JobSummary
    if name in __all__:
        from . import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'ternpool.cluster' has no attribute {name!r}")
