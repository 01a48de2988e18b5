"""Where a model lives: a local directory, or a Hugging Face Hub id downloaded when online."""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelFormatError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# JSON and safetensors only: nothing that would be unpickled or executed.
_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.txt"]


def resolve_model_dir(model: str | Path) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFormatError(f"{path}: expected a model directory, found a file")
    name = str(model)
    if not _HUB_ID.match(name):
        raise ModelFormatError(f"{name}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=_ALLOW))
    except Exception as e:  # network errors come in many types; say what to do instead
        raise ModelFormatError(
            f"{name}: not a local directory, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}). If this machine is offline, download the model elsewhere and "
            f"pass its local directory, or make a random one with `ternpool make-model`.") from e
