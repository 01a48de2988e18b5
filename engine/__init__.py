"""ternpool.engine: config, weight loading, forward pass, sampling, tokenizer and batched
generation in one process. Never imports Ray or pyarrow.

The names below are imported on first use, so that importing a submodule such as
`ternpool.engine.requests` (which `ternpool.jobs` does) loads neither the engine nor the Numba
kernels: `ternpool status`, `cancel` and `--help` stay fast.
"""

__all__ = ["Engine", "EngineConfig", "ModelConfig", "ModelFormatError", "Request", "Result", "SamplingParams"]

_HOMES = {"Engine": "engine", "EngineConfig": "options", "ModelConfig": "config", "ModelFormatError": "config",
          "Request": "requests", "Result": "requests", "SamplingParams": "requests"}


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'ternpool.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
