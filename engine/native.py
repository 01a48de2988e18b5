"""ternpool's native weight file: the layout the kernels read, memory-mapped read-only.

A converted model is a directory with the source's config.json, tokenizer and
generation files, `ternpool.json` (what it is and where it came from) and one
safetensors file, `weights.ternpool.safetensors`, whose `__metadata__` carries
the format name and version (checked at load) and whose tensors are:

    embed                       BF16 (vocab, hidden)   token embedding (also the bf16 output head)
    head.q / head.scale         I8 (vocab, hidden) / F32 (vocab,)   per-row int8 output head
    norm                        F32 (hidden,)
    layers.N.<norm>             F32: input_norm, post_attention_norm, attn_sub_norm, ffn_sub_norm
    layers.N.<linear>.weight    U8: "2bit" = Hugging Face packing (out/4, in);
                                    "1.6bit" = base-3, 5 weights a byte (out, 32*ceil(in/160))
    layers.N.<linear>.scale     F32 (1,): the weight scale as the source stores it

Nothing is converted at load: every tensor is a view of the page cache, so
all processes on a node share one copy and a load takes milliseconds.
`convert` streams one tensor at a time (large tensors in row blocks), so
models larger than RAM convert. `ensure_native` converts a Hugging Face
model once into a cache directory; concurrent loaders wait on a file lock
and the finished directory appears by an atomic rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ternpool.kernels import pack_ternary
from ternpool.kernels.base3 import pack_base3
from ternpool.kernels.config import cache_root
from ternpool.kernels.head8 import quantize_head

from .config import ModelConfig, ModelFormatError, read_json
from .identity import SIDE_FILE_PATTERNS, model_digests
from .modelfiles import check_links
from .options import DEFAULT_WEIGHTS_FORMAT, WEIGHTS_FORMATS
from .safetensors_io import INDEX_FILE, TensorInfo, TensorSpec, index_model, read_header, read_metadata, \
    write_safetensors
from .shapes import LINEARS, linear_shapes, module_of, packed_shape
from .weights import LayerWeights, as_f32, ModelWeights, TernaryLinear, check_native_tensors, check_tensors, \
    online_factors

log = logging.getLogger(__name__)

FORMAT = "ternpool-native"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.ternpool.safetensors"
MARKER = "ternpool.json"
NORMS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
         "attn_sub_norm": "self_attn.attn_sub_norm", "ffn_sub_norm": "mlp.ffn_sub_norm"}
_ROWS = 4096  # row block for streaming large tensors
_COPY = SIDE_FILE_PATTERNS  # config, generation and tokenizer files


def is_native(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MARKER).exists()


def default_cache_dir() -> Path:
    """Converted models go under `native/` of ternpool's cache (TERNPOOL_CACHE_DIR, else ~/.cache/ternpool)."""
    return cache_root() / "native"


def source_fingerprint(model_dir: Path) -> str:
    """sha256 over the content of every file of the source model (weights, config, tokenizer and
    chat template files: `identity.model_files`), so that any change makes a new conversion."""
    h = hashlib.sha256()
    for name, digest in model_digests(model_dir).items():
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()


def _check_format(weights_format: str) -> None:
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(f"weights format must be one of {WEIGHTS_FORMATS}, got {weights_format!r}")


def native_specs(cfg: ModelConfig, weights_format: str) -> list[TensorSpec]:
    """The tensors of a native file, in file order (layer by layer)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec("embed", "BF16", (v, h)), TensorSpec("head.q", "I8", (v, h)),
             TensorSpec("head.scale", "F32", (v,)), TensorSpec("norm", "F32", (h,))]
    for n in range(cfg.num_hidden_layers):
        for ours in NORMS:
            size = cfg.intermediate_size if ours == "ffn_sub_norm" else h
            specs.append(TensorSpec(f"layers.{n}.{ours}", "F32", (size,)))
        for name, (o, k) in linear_shapes(cfg).items():
            specs += [TensorSpec(f"layers.{n}.{name}.weight", "U8", packed_shape(weights_format, o, k)),
                      TensorSpec(f"layers.{n}.{name}.scale", "F32", (1,))]
    return specs


class _Producer:
    """Makes each native tensor from the source checkpoint, one tensor (or row block) at a time."""

    def __init__(self, tensors: dict[str, TensorInfo], cfg: ModelConfig, weights_format: str):
        self.t, self.cfg, self.fmt = tensors, cfg, weights_format
        self._online_scales: dict[str, float] = {}

    def _f32(self, name: str) -> np.ndarray:
        return as_f32(self.t[name])

    def _source_linear(self, layer: str, name: str) -> str:
        return f"model.layers.{layer}.{module_of(name)}.{name}."

    def _ternary_rows(self, base: str) -> Iterator[np.ndarray]:
        """Ternary int8 rows of a source linear, in blocks of about _ROWS rows, in output order."""
        w = self.t[base + "weight"]
        if self.cfg.quantization_mode == "online":
            s = self._online(base)[0]
            for a in range(0, w.shape[0], _ROWS):
                yield np.clip(np.round(as_f32(w, a, a + _ROWS) * s), -1, 1).astype(np.int8)
        else:
            # HF packing: output row i * R + r sits in bits 2i of packed[r]; stripe by stripe
            packed = w.load()
            step = max(1, _ROWS // 4)
            for i in range(4):
                for a in range(0, packed.shape[0], step):
                    codes = (np.asarray(packed[a:a + step]) >> np.uint8(2 * i)) & np.uint8(3)
                    yield codes.astype(np.int8) - np.int8(1)

    def _online(self, base: str) -> tuple[np.float32, float]:
        """transformers' online rule needs mean|W| of the whole tensor: one streaming pass first."""
        if base not in self._online_scales:
            info = self.t[base + "weight"]
            total = 0.0
            for a in range(0, info.shape[0], _ROWS):
                total += float(np.abs(as_f32(info, a, a + _ROWS)).sum(dtype=np.float64))
            self._online_scales[base] = online_factors(float(np.float32(total / (info.shape[0] * info.shape[1]))))
        return self._online_scales[base]

    def __call__(self, spec: TensorSpec):
        name = spec.name
        if name == "embed":
            return self.t["model.embed_tokens.weight"].load()
        if name in ("head.q", "head.scale"):
            return self._head(name)
        if name == "norm":
            return self._f32("model.norm.weight")
        _, layer, rest = name.split(".", 2)
        if rest in NORMS:
            return self._f32(f"model.layers.{layer}.{NORMS[rest]}.weight")
        linear, kind = rest.split(".")
        base = self._source_linear(layer, linear)
        if kind == "scale":
            if self.cfg.quantization_mode == "online":
                return np.array([self._online(base)[1]], np.float32)
            return self._f32(base + "weight_scale").reshape(1)
        if self.fmt == "2bit" and self.cfg.quantization_mode != "online":
            return self.t[base + "weight"].load()  # already in the kernel's layout: a straight copy
        return self._packed(base)

    def _packed(self, base: str) -> Iterator[np.ndarray]:
        if self.fmt == "1.6bit":
            for rows in self._ternary_rows(base):
                yield pack_base3(rows)
            return
        # online source to 2-bit: HF packing puts rows r, R + r, 2R + r, 3R + r in one packed row,
        # so take the same stripe of each quarter per block
        info = self.t[base + "weight"]
        R = info.shape[0] // 4
        s = self._online(base)[0]
        step = max(1, _ROWS // 4)
        for a in range(0, R, step):
            b = min(R, a + step)
            rows = np.concatenate([as_f32(info, i * R + a, i * R + b) for i in range(4)])
            yield pack_ternary(np.clip(np.round(rows * s), -1, 1).astype(np.int8))

    def _head(self, name: str) -> Iterator[np.ndarray]:
        """The int8 head, row block by row block (scales in a second pass over the embedding)."""
        embed = self.t["model.embed_tokens.weight"].load()
        for a in range(0, embed.shape[0], _ROWS):
            q, scale = quantize_head(embed[a:a + _ROWS])
            yield q if name == "head.q" else scale


def convert(model_dir: str | Path, out_dir: str | Path, weights_format: str = DEFAULT_WEIGHTS_FORMAT,
            progress=None) -> Path:
    """Convert a Hugging Face BitNet directory into a native one at `out_dir` (created; written to
    a temporary sibling and renamed, so `out_dir` either is complete or does not exist)."""
    _check_format(weights_format)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if is_native(model_dir):
        raise ModelFormatError(f"{model_dir}: already a ternpool native model")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; remove it or choose another --out")
    check_links(model_dir)  # the files copied below must be the model's own
    cfg = ModelConfig.from_dir(model_dir)
    tensors = index_model(model_dir)
    check_tensors(model_dir, tensors, cfg)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in sorted({p for pattern in _COPY for p in model_dir.glob(pattern)}):
            if p.is_file() and p.name != INDEX_FILE:
                shutil.copy2(p, tmp / p.name)
        specs = native_specs(cfg, weights_format)
        produce = _Producer(tensors, cfg, weights_format)

        def step(spec: TensorSpec):
            if progress is not None:
                progress(spec)
            return produce(spec)

        t0 = time.perf_counter()
        size = write_safetensors(tmp / WEIGHTS_FILE, specs, step, metadata={
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "weights_format": weights_format})
        marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights_format": weights_format,
                  "source": str(model_dir.resolve()), "source_fingerprint": source_fingerprint(model_dir),
                  "weights_bytes": size}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s (%s, %.1f MB) in %.1f s", model_dir, out_dir, weights_format, size / 1e6,
             time.perf_counter() - t0)
    return out_dir


def ensure_native(model_dir: str | Path, weights_format: str | None = None,
                  cache_dir: str | Path | None = None) -> Path:
    """A native directory for `model_dir`: itself when it is one, else its converted copy in the
    cache (converted now if missing; concurrent callers wait for one conversion)."""
    model_dir = Path(model_dir)
    if is_native(model_dir):
        have = native_info(model_dir)["weights_format"]
        if weights_format is not None and weights_format != have:
            raise ModelFormatError(f"{model_dir}: a native model in {have} format, not {weights_format}; "
                                   "convert the original Hugging Face model with that --weights-format")
        return model_dir
    weights_format = weights_format or DEFAULT_WEIGHTS_FORMAT
    _check_format(weights_format)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"{source_fingerprint(model_dir)[:20]}-{weights_format}-v{FORMAT_VERSION}"
    target = cache / key
    if is_native(target):
        return target
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with open(cache / ".locks" / key, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter; the others wait here, then find it done
        try:
            if not is_native(target):
                log.info("converting %s into the cache %s (once)", model_dir, target)
                convert(model_dir, target, weights_format)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def native_info(model_dir: str | Path) -> dict:
    """`ternpool.json` of a native directory, with its format version checked."""
    path = Path(model_dir) / MARKER
    info = read_json(path)
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format {info.get('format')!r} version {info.get('format_version')!r}; "
                               f"this ternpool reads {FORMAT} version {FORMAT_VERSION}: convert the model again")
    if info.get("weights_format") not in WEIGHTS_FORMATS:
        raise ModelFormatError(f"{path}: unknown weights_format {info.get('weights_format')!r}")
    return info


def resolved_weights_format(model_dir: str | Path, requested: str | None) -> str:
    """The weights format a load of `model_dir` will use: the one asked for, else a native directory's
    own, else the default."""
    if requested is not None:
        return requested
    return native_info(model_dir)["weights_format"] if is_native(model_dir) else DEFAULT_WEIGHTS_FORMAT


def load_native(model_dir: str | Path, cfg: ModelConfig) -> ModelWeights:
    """Map a native directory's tensors (no copies but the small norms)."""
    model_dir = Path(model_dir)
    fmt = native_info(model_dir)["weights_format"]
    path = model_dir / WEIGHTS_FILE
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION) \
            or meta.get("weights_format") != fmt:
        raise ModelFormatError(f"{path}: metadata {meta} does not match {MARKER} "
                               f"({FORMAT} version {FORMAT_VERSION}, {fmt}); convert the model again")
    tensors = read_header(path)
    check_native_tensors(path, tensors, native_specs(cfg, fmt))
    layout = "i2" if fmt == "2bit" else "b3"

    def lin(n: int, name: str) -> TernaryLinear:
        ws = float(tensors[f"layers.{n}.{name}.scale"].load()[0])
        if not np.isfinite(ws) or ws == 0.0:
            raise ModelFormatError(f"{path}: tensor layers.{n}.{name}.scale is {ws}")
        return TernaryLinear(tensors[f"layers.{n}.{name}.weight"].load(), ws,
                             cfg.scale_divides and cfg.quantization_mode != "online", layout,
                             linear_shapes(cfg)[name][1])

    layers = tuple(
        LayerWeights(**{ours: np.array(tensors[f"layers.{n}.{ours}"].load()) for ours in NORMS},
                     **{name: lin(n, name) for name in LINEARS})
        for n in range(cfg.num_hidden_layers))
    return ModelWeights(cfg, tensors["embed"].load(), np.array(tensors["norm"].load()), layers,
                        head_q=tensors["head.q"].load(), head_scale=tensors["head.scale"].load(),
                        weights_format=fmt)
