"""Reading and writing safetensors files without the safetensors NumPy API.

The NumPy API cannot read bfloat16, and copies every tensor. Here the header
(8-byte little-endian length + JSON) is parsed directly and each tensor is
memory-mapped read-only, so pages are shared through the page cache by every
process on a node. bf16 tensors come back as uint16 bit patterns.
Writing streams tensor by tensor, so files larger than RAM can be made.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .config import ModelFormatError, read_json
from .modelfiles import clip_repr, model_file

# safetensors dtype -> (numpy storage dtype, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
}
_MAX_HEADER = 100 * 1024 * 1024
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize

    def load(self) -> np.ndarray:
        """Read-only memory map of the tensor (bf16 as uint16)."""
        dt = DTYPES[self.dtype]
        count = int(np.prod(self.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(self.shape, dtype=dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=self.shape)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file ({} when it has none)."""
    header, _, _ = _raw_header(Path(path))
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _raw_header(path: Path) -> tuple[dict, int, int]:
    """The parsed JSON header, the byte offset where tensor data starts, and the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:  # the length is not quoted: it is 8 bytes of the file
                raise ModelFormatError(f"{path}: the header length does not fit a file of {size} bytes "
                                       "(truncated or not a safetensors file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    try:
        header = read_json(path, raw)
    except ModelFormatError as e:
        raise ModelFormatError(f"safetensors header of {e}") from None
    return header, 8 + n, size


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; errors name the file and tensor."""
    path = Path(path)
    header, base, size = _raw_header(path)
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {clip_repr(name)}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise ModelFormatError(f"{where}: header entry needs 'dtype', 'shape' and 'data_offsets'")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFormatError(f"{where}: unsupported dtype {clip_repr(dtype, 20)} (ternpool reads {list(DTYPES)})")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise ModelFormatError(f"{where}: shape must be a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets) \
                or offsets[0] > offsets[1]:
            raise ModelFormatError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end")
        shape, (start, end) = tuple(shape), offsets
        expect = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - start != expect:
            raise ModelFormatError(f"{where} {dtype}{list(shape)} needs {expect} bytes, "
                                   f"header gives {end - start}")
        if base + end > size:
            raise ModelFormatError(f"{where} ends at byte {base + end} but the file has "
                                   f"{size} bytes (truncated file)")
        out[name] = TensorInfo(name, path, dtype, shape, base + start)
    _check_overlaps(path, out)
    end = max((t.offset + t.nbytes for t in out.values()), default=base)
    if end != size:  # safetensors' own reader refuses such files too
        raise ModelFormatError(f"{path}: the file has {size} bytes but its tensors end at byte {end} "
                               "(bytes after the last tensor: a damaged or mislabelled file)")
    return out


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    """No two tensors share bytes (a header pointing two tensors at one buffer is corrupt)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise ModelFormatError(f"{path}: tensors {clip_repr(a)} and {clip_repr(b)} overlap (bytes {start}..{end - 1})")


def index_model(model_dir: str | Path) -> dict[str, TensorInfo]:
    """All tensors of a model directory: `model.safetensors`, or shards listed in the index file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(model_file(model_dir, INDEX_FILE, "index file")).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelFormatError(f"{index}: 'weight_map' must be an object of tensor name -> file name")
        tensors: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            for name, info in read_header(model_file(model_dir, file, f"shard in {INDEX_FILE}")).items():
                if weight_map.get(name) != file:
                    raise ModelFormatError(f"{model_dir / file}: tensor {name!r} is not listed for this file "
                                           f"in {INDEX_FILE}")
                tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ModelFormatError(f"{index}: tensors listed but not found in their files: {missing[:5]}")
        return tensors
    single = model_dir / SINGLE_FILE
    if single.exists():
        return read_header(model_file(model_dir, SINGLE_FILE, "weights file"))
    raise ModelFormatError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def write_safetensors(path: str | Path, specs: Iterable[TensorSpec],
                      produce: Callable[[TensorSpec], np.ndarray | Iterable[np.ndarray]],
                      metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into a safetensors file, calling `produce(spec)` one tensor at a time.

    `produce` returns the tensor, or an iterable of consecutive row blocks of it (so that one
    large tensor need not be in memory at once). Written to `path + '.tmp'` and renamed when
    complete. Returns the file size.
    """
    path = Path(path)
    specs = list(specs)
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align tensor data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            data = produce(s)
            blocks = [data] if isinstance(data, np.ndarray) else data
            rows = 0
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=DTYPES[s.dtype])
                if block.shape[1:] != s.shape[1:] or rows + block.shape[0] > s.shape[0]:
                    raise ValueError(f"tensor {s.name}: produced a block of shape {block.shape}, declared {s.shape}")
                rows += block.shape[0]
                f.write(memoryview(block).cast("B"))
            if rows != s.shape[0]:
                raise ValueError(f"tensor {s.name}: produced {rows} rows, declared {s.shape}")
    tmp.replace(path)
    return 8 + len(raw) + offset
