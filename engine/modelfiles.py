"""Which files a model may refer to: only files inside its own directory.

A model directory names other files in `model.safetensors.index.json` (its shards) and in
`tokenizer_config.json`, and may hold symlinks. Each must resolve inside the directory, so that a
model cannot make ternpool read (or copy into its cache, or quote in an error) a file that is not
part of it. A Hugging Face Hub snapshot (`.../snapshots/<revision>/`, whose files are symlinks to
`../../blobs/`) may point anywhere inside its repository's cache folder.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .config import ModelFormatError


def model_root(model_dir: str | Path) -> Path:
    """The directory every file of the model must resolve inside."""
    real = Path(model_dir).resolve()
    return real.parent.parent if real.parent.name == "snapshots" else real


def model_file(model_dir: str | Path, name, what: str) -> Path:
    """`model_dir / name` for a file the model refers to as `what` (e.g. "shard in weight_map"):
    ModelFormatError naming the entry unless `name` is a relative path without '..' that resolves
    (symlinks followed) inside the model."""
    model_dir = Path(model_dir)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name \
            or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise ModelFormatError(f"{model_dir}: {what} {clip_repr(name)} must be a relative file name inside the "
                               "model directory")
    path = model_dir / name
    if not path.resolve().is_relative_to(model_root(model_dir)):
        raise ModelFormatError(f"{path}: {what} {clip_repr(name)} is a link to a file outside the model directory "
                               f"{model_dir}; refused (copy the file into the directory instead)")
    return path


def check_links(model_dir: str | Path) -> None:
    """Every symlink directly in the model directory points inside the model."""
    model_dir = Path(model_dir)
    for entry in sorted(model_dir.iterdir()):
        if entry.is_symlink():
            model_file(model_dir, entry.name, "entry")


def check_tokenizer_config(model_dir: str | Path, config: dict) -> None:
    """transformers opens a `*_file` path given in tokenizer_config.json as it is (relative to the
    working directory, or absolute) instead of the model's own file: refuse any."""
    for key, value in config.items():
        if key.endswith(("_file", "_files")) and value is not None:
            raise ModelFormatError(f"{Path(model_dir) / 'tokenizer_config.json'}: {key} = {clip_repr(value)} points "
                                   "the tokenizer at a file by path; remove the key (the model's own "
                                   "tokenizer files are found by name)")


def clip_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
