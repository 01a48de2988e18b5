"""What a model is made of and what identifies it: the files of a model directory (config,
generation config, weights and their index, tokenizer and chat template files) and the sha256 of
each, hashed once and cached by (path, size, mtime, ctime, inode) in the ternpool cache directory,
so that a 25 GB model is read once, not at every run. Used by the job manifest (resume identity)
and by the native-conversion cache key."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# config, generation and tokenizer files (also what a native conversion copies), then the weights
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "tokenizer*")
MODEL_FILE_PATTERNS = SIDE_FILE_PATTERNS + ("*.safetensors",)
_BLOCK = 1 << 20  # bytes read at a time while hashing


def model_files(model_dir: str | Path) -> list[Path]:
    """The files a model directory is made of, sorted by name (hidden files are not)."""
    model_dir = Path(model_dir)
    found = {p for pattern in MODEL_FILE_PATTERNS for p in model_dir.glob(pattern)}
    return sorted((p for p in found if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes, streamed in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file, from the cache when the file is unchanged since it was hashed (same size,
    mtime, ctime and inode), else hashed now and cached. An unwritable cache is logged, not fatal."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if cache_dir is None:
        from ternpool.kernels.config import cache_root  # the one cache root (imported here: `status` loads no Numba)

        cache_dir = cache_root() / "hashes"
    cache = Path(cache_dir)
    entry = cache / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    try:
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if cached.get("path") == str(path) and cached.get("stamp") == stamp:
            return cached["sha256"]
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, KeyError) as exc:
        log.warning("ignoring unreadable hash cache entry %s: %s", entry, exc)
    digest = hash_file(path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}), encoding="utf-8")
        os.replace(tmp, entry)
    except OSError as exc:
        log.warning("could not cache the hash of %s in %s (%s); it will be hashed again next time",
                    path, cache, exc)
    return digest


def model_digests(model_dir: str | Path, cache_dir: str | Path | None = None) -> dict[str, str]:
    """file name -> sha256 for every file of the model (`model_files`)."""
    return {p.name: file_digest(p, cache_dir) for p in model_files(model_dir)}


def file_role(name: str) -> str:
    """What a model file is, for messages: 'model weights', 'tokenizer', 'chat template', ..."""
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return "model weights"
    if name == "config.json":
        return "model config"
    if name == "generation_config.json":
        return "generation config"
    if name.endswith(".jinja") or name.startswith("chat_template"):
        return "chat template"
    if name.startswith("tokenizer") or name in ("special_tokens_map.json", "added_tokens.json", "vocab.json",
                                                "merges.txt") or name.endswith(".model"):
        return "tokenizer"
    return "model file"
