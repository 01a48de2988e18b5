"""ternpool.engine: config, weight loading, forward pass, sampling, tokenizer and batched
generation in one process. Never imports Ray or pyarrow."""

from .config import ModelConfig, ModelFormatError
from .engine import Engine
from .requests import Request, Result, SamplingParams

__all__ = ["Engine", "ModelConfig", "ModelFormatError", "Request", "Result", "SamplingParams"]
