"""`validate_model`: everything about a model that can be checked without reading its weights.

The config, every tensor header against it (names, shapes, dtypes, offsets inside the file, no
overlaps), the files it refers to (inside its directory), the tokenizer and its chat template. A job
calls this before any worker starts; `Engine.load` runs the same checks (through the functions
here and the ones they call), so a model that passes here loads.
"""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig, ModelFormatError, read_json
from .modelfiles import check_links, check_tokenizer_config, model_file
from .native import WEIGHTS_FILE, is_native, native_info, native_specs
from .safetensors_io import index_model, read_header
from .tokenizer import Tokenizer
from .weights import check_native_tensors, check_tensors

# rendered through the chat template to check that it works on an ordinary conversation
PROBE_CONVERSATION = ({"role": "user", "content": "Hello"},)


def check_weights(model_dir: str | Path, cfg: ModelConfig) -> None:
    """Every tensor header of a Hugging Face or native directory against `cfg`; no tensor data is read."""
    model_dir = Path(model_dir)
    check_links(model_dir)
    if is_native(model_dir):
        path = model_file(model_dir, WEIGHTS_FILE, "weights file")
        check_native_tensors(path, read_header(path), native_specs(cfg, native_info(model_dir)["weights_format"]))
    else:
        check_tensors(model_dir, index_model(model_dir), cfg)


def load_tokenizer(model_dir: str | Path, cfg: ModelConfig) -> Tokenizer:
    """The model's tokenizer, checked: its JSON files parse, refer to no outside file, its ids fit
    the vocabulary, and its chat template (when it has one) renders a short conversation."""
    model_dir = Path(model_dir)
    check_links(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            data = read_json(model_file(model_dir, name, "tokenizer file"))
            if name == "tokenizer_config.json":
                check_tokenizer_config(model_dir, data)
    tok = Tokenizer(model_dir)
    if len(tok) > cfg.vocab_size:
        raise ModelFormatError(f"{model_dir}: the tokenizer has {len(tok)} ids but vocab_size is {cfg.vocab_size}")
    if tok.has_chat_template:
        try:
            tok.render_chat(list(PROBE_CONVERSATION))
        except Exception as e:  # jinja2 and transformers raise many types; name the template
            raise ModelFormatError(f"{model_dir}: the chat template does not render a one-message conversation "
                                   f"({type(e).__name__}: {e})") from None
    return tok


def validate_model(model_dir: str | Path) -> ModelConfig:
    """Check a model directory (Hugging Face or native) without reading tensor data; returns its
    config. ModelFormatError (a ValueError) naming the file and tensor or key at fault."""
    model_dir = Path(model_dir)
    check_links(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    check_weights(model_dir, cfg)
    load_tokenizer(model_dir, cfg)
    return cfg
