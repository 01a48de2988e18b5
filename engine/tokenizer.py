"""Prompts to token ids and back, through `transformers.AutoTokenizer` of the model directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no advice about PyTorch on import
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers raises many types here; name the directory
            raise ValueError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, prompt: str) -> list[int]:
        """Plain text, with the beginning-of-text token the tokenizer adds."""
        return list(self.tok(prompt)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; pass a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must have string 'role' and 'content', got {m!r}")
        return self.tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Chat turns through the model's template (which writes the bos itself)."""
        return list(self.tok(self.render_chat(messages), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
