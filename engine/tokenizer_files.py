"""Write Hugging Face tokenizer files for BitNet b1.58 2B4T-style test models.

Two tokenizers are offered, both loadable with ``transformers.AutoTokenizer``:

* :func:`write_small_tokenizer` trains a tiny byte-level BPE (Llama-3 split
  pattern + GPT-2 byte mapping) on the corpus bundled in ``data/corpus.txt`` and
  appends the first 16 Llama-3 special tokens, so random models can use a small
  embedding while keeping Llama-3's relative special-token layout.
* :func:`write_llama3_tokenizer` converts the real Llama-3 tiktoken file shipped
  in the ``llama-models`` package (128,256 ids, as used by 2B4T). No network.

Both write ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` (JSON only) and return a :class:`TokenizerInfo`.
``tokenizer(text)`` prepends ``<|begin_of_text|>`` exactly once; the chat
template already contains the bos, so chat prompts are encoded without adding it.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip
#: The 256 Llama-3(.1) special tokens, in id order 128000..128255.
LLAMA3_SPECIAL_TOKENS: list[str] = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_LLAMA3_NAMED_SPECIALS))
]

#: Chat template of microsoft/bitnet-b1.58-2B-4T.
CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{% set content = message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

#: Llama-3 pre-tokenizer split pattern (same as tiktoken's ``pat_str``).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS_TOKEN, EOS_TOKEN, EOT_TOKEN = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA3_BASE_VOCAB = 128_000
SMALL_NUM_SPECIAL = 16
BYTE_ALPHABET_SIZE = 256
MIN_SMALL_VOCAB = 300  # 256 byte tokens + 16 specials + at least 28 merges
MODEL_MAX_LENGTH = 4096
LLAMA3_INSTALL_HINT = "pip install 'ternpool[llama3]'"
_CORPUS_PATH = Path(__file__).resolve().parent / "data" / "corpus.txt"


@dataclass(frozen=True)
class TokenizerInfo:
    """Ids a model config needs to agree with the written tokenizer."""

    vocab_size: int  # total ids incl. special tokens
    bos_token_id: int
    eos_token_id: int  # <|end_of_text|>
    eot_token_id: int  # <|eot_id|>


def write_small_tokenizer(out_dir: str | Path, vocab_size: int) -> TokenizerInfo:
    """Train a deterministic byte-level BPE with exactly ``vocab_size`` ids and write it to ``out_dir``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_SMALL_VOCAB:
        raise ValueError(
            f"vocab_size must be an int >= {MIN_SMALL_VOCAB} ({BYTE_ALPHABET_SIZE} byte tokens + "
            f"{SMALL_NUM_SPECIAL} special tokens + merges), got {vocab_size!r}"
        )
    start = time.perf_counter()
    n_bpe = vocab_size - SMALL_NUM_SPECIAL
    tok = _pad_bpe_vocab(_train_byte_level_bpe(n_bpe), n_bpe)
    info = _finalize(tok, LLAMA3_SPECIAL_TOKENS[:SMALL_NUM_SPECIAL], n_bpe, out_dir)
    logger.info("wrote small tokenizer (%d ids) to %s in %.2fs", vocab_size, out_dir, time.perf_counter() - start)
    return info


def write_llama3_tokenizer(out_dir: str | Path) -> TokenizerInfo:
    """Convert Llama-3's tiktoken ``tokenizer.model`` from ``llama-models`` and write it to ``out_dir``."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalTikTokenConverter(TikTokenConverter):
        # tiktoken's loader caches every file it reads under the temp dir, keyed by path;
        # parsing the (base64 token, rank) lines ourselves avoids that and the tiktoken dependency.
        load_tiktoken_bpe = staticmethod(_read_tiktoken_ranks)

    start = time.perf_counter()
    model_path = _llama3_model_path()
    tok = _LocalTikTokenConverter(vocab_file=str(model_path), pattern=LLAMA3_PATTERN).converted()
    info = _finalize(tok, LLAMA3_SPECIAL_TOKENS, LLAMA3_BASE_VOCAB, out_dir)
    logger.info("wrote Llama-3 tokenizer to %s in %.2fs", out_dir, time.perf_counter() - start)
    return info


def _train_byte_level_bpe(n_bpe: int) -> Tokenizer:
    """Train up to ``n_bpe`` BPE tokens (all 256 byte tokens first) on the bundled corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(  # same split as Llama-3, then GPT-2 byte mapping
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    if not _CORPUS_PATH.is_file():
        raise RuntimeError(f"bundled tokenizer corpus missing: expected a file at {_CORPUS_PATH}")
    tok.train_from_iterator(_CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() < BYTE_ALPHABET_SIZE:
        raise RuntimeError(f"trained BPE has {tok.get_vocab_size()} tokens, expected >= {BYTE_ALPHABET_SIZE}")
    return tok


def _pad_bpe_vocab(tok: Tokenizer, n_bpe: int) -> Tokenizer:
    """Fill the BPE vocab up to ``n_bpe`` with merge-less (never produced, still decodable) entries.

    The corpus only supports about 5,000 BPE tokens; larger vocabularies get filler ids so that the
    embedding row count and the tokenizer agree exactly.
    """
    have = tok.get_vocab_size()
    if have >= n_bpe:
        return tok
    spec: dict[str, Any] = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for token_id in range(have, n_bpe):
        filler = f"<|unused_bpe_{token_id}|>"
        if filler in vocab:
            raise RuntimeError(f"filler token {filler!r} unexpectedly already in the trained vocab")
        vocab[filler] = token_id
    logger.info("corpus yielded %d BPE tokens; padded with %d unused ids to %d", have, n_bpe - have, n_bpe)
    return Tokenizer.from_str(json.dumps(spec))


def _finalize(tok: Tokenizer, specials: list[str], base: int, out_dir: str | Path) -> TokenizerInfo:
    """Append ``specials`` at ids ``base..``, add the bos post-processor, check ids, write files."""
    if tok.get_vocab_size(with_added_tokens=True) != base:
        found = tok.get_vocab_size(with_added_tokens=True)
        raise RuntimeError(f"expected {base} BPE ids before adding special tokens, found {found}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    info = TokenizerInfo(
        vocab_size=base + len(specials),
        bos_token_id=base + specials.index(BOS_TOKEN),
        eos_token_id=base + specials.index(EOS_TOKEN),
        eot_token_id=base + specials.index(EOT_TOKEN),
    )
    _check_ids(tok, info)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, info.bos_token_id)],
            ),
        ]
    )
    _write_files(Path(out_dir), tok)
    return info


def _check_ids(tok: Tokenizer, info: TokenizerInfo) -> None:
    total = tok.get_vocab_size(with_added_tokens=True)
    if total != info.vocab_size:
        raise RuntimeError(f"tokenizer has {total} ids, expected {info.vocab_size}")
    expected_ids = {BOS_TOKEN: info.bos_token_id, EOS_TOKEN: info.eos_token_id, EOT_TOKEN: info.eot_token_id}
    for token, expected in expected_ids.items():
        found = tok.token_to_id(token)
        if found != expected:
            raise RuntimeError(f"{token} has id {found}, expected {expected}")


def _write_files(out_dir: Path, tok: Tokenizer) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        name: {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
        for name, token in (("bos_token", BOS_TOKEN), ("eos_token", EOS_TOKEN))
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_map)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _llama3_model_path() -> Path:
    """Locate ``llama_models/llama3/tokenizer.model`` without importing ``llama_models``."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the Llama-3 tokenizer needs the 'llama-models' package (it ships llama3/tokenizer.model), "
            f"which is not installed; run: {LLAMA3_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"'llama_models' found at {list(spec.submodule_search_locations)} but without llama3/tokenizer.model; "
        f"reinstall it: {LLAMA3_INSTALL_HINT}"
    )


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one ``<base64 token> <rank>`` pair per line."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise RuntimeError(f"{path}:{line_no}: expected '<base64> <rank>', found {line[:60]!r}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RuntimeError(f"{path}: expected ranks 0..{len(ranks) - 1} without gaps or duplicates")
    return ranks
