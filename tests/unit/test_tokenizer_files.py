"""Tests for ternpool.engine.tokenizer_files (small trained BPE and converted Llama-3 tokenizer)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import transformers

from ternpool.engine import tokenizer_files
from ternpool.engine.tokenizer_files import (
    CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    TokenizerInfo,
    write_llama3_tokenizer,
    write_small_tokenizer,
)

UNICODE_TEXT = "Ça va? Größe — naïve café, Ελληνικά, русский, 東京の桜, 서울, 😀👍 👩‍💻 🇫🇷"
CHAT = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
CHAT_TEXT = "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
WRITTEN_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def _load(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _chat_ids(tok) -> list[int]:
    out = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TokenizerInfo]:
    pytest.importorskip("llama_models")
    out = tmp_path_factory.mktemp("llama3_tok")
    return out, write_llama3_tokenizer(out)


@pytest.fixture(scope="module")
def llama3_tok(llama3_dir: tuple[Path, TokenizerInfo]):
    return _load(llama3_dir[0])


@pytest.mark.unit
def test_llama3_special_token_list() -> None:
    assert len(LLAMA3_SPECIAL_TOKENS) == 256
    assert len(set(LLAMA3_SPECIAL_TOKENS)) == 256
    assert LLAMA3_SPECIAL_TOKENS[:11] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    assert LLAMA3_SPECIAL_TOKENS[11] == "<|reserved_special_token_3|>"
    assert LLAMA3_SPECIAL_TOKENS[-1] == "<|reserved_special_token_247|>"


@pytest.mark.unit
@pytest.mark.parametrize("vocab_size", [300, 1000, 4096])
def test_small_tokenizer_ids_and_size(tmp_path: Path, vocab_size: int) -> None:
    info = write_small_tokenizer(tmp_path, vocab_size)
    base = vocab_size - 16
    assert info == TokenizerInfo(vocab_size=vocab_size, bos_token_id=base, eos_token_id=base + 1,
                                 eot_token_id=base + 9)
    assert {p.name for p in tmp_path.iterdir()} == WRITTEN_FILES
    tok = _load(tmp_path)
    assert len(tok) == vocab_size
    assert tok.bos_token_id == info.bos_token_id
    assert tok.eos_token_id == info.eos_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") == info.eot_token_id
    assert tok.convert_ids_to_tokens(list(range(base, vocab_size))) == LLAMA3_SPECIAL_TOKENS[:16]
    assert tok.model_max_length == 4096


@pytest.mark.unit
def test_small_tokenizer_vocab_is_exact_when_corpus_runs_out_of_merges(tmp_path: Path) -> None:
    vocab_size = 8192  # well past the ~5k tokens the bundled corpus supports
    info = write_small_tokenizer(tmp_path, vocab_size)
    tok = _load(tmp_path)
    assert len(tok) == info.vocab_size == vocab_size
    tokens = tok.convert_ids_to_tokens(list(range(vocab_size)))
    assert None not in tokens and len(set(tokens)) == vocab_size
    for token_id in range(vocab_size):
        assert isinstance(tok.decode([token_id]), str)
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    assert tok.decode(ids) == UNICODE_TEXT


def _write_small(path: Path, vocab_size: int) -> Path:
    write_small_tokenizer(path, vocab_size)
    return path


@pytest.mark.unit
def test_small_tokenizer_bytes_always_present(tmp_path: Path) -> None:
    tok = _load(_write_small(tmp_path, 300))
    ids = tok.encode("\x00\x07\x7f\u0300 \U0010fffd", add_special_tokens=False)
    assert all(0 <= i < 300 - 16 for i in ids)
    assert tok.decode(ids) == "\x00\x07\x7f\u0300 \U0010fffd"


@pytest.mark.unit
def test_small_tokenizer_adds_bos_once(tmp_path: Path) -> None:
    info = write_small_tokenizer(tmp_path, 512)
    tok = _load(tmp_path)
    for ids in (tok("Hello world")["input_ids"], tok.encode("Hello world")):
        assert ids[0] == info.bos_token_id
        assert ids.count(info.bos_token_id) == 1
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert info.bos_token_id not in plain
    assert tok.encode("Hello world") == [info.bos_token_id] + plain


@pytest.mark.unit
@pytest.mark.parametrize("vocab_size", [300, 4096])
def test_small_tokenizer_unicode_round_trip(tmp_path: Path, vocab_size: int) -> None:
    tok = _load(_write_small(tmp_path, vocab_size))
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    assert all(0 <= i < vocab_size - 16 for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(tok.encode(UNICODE_TEXT), skip_special_tokens=True) == UNICODE_TEXT


@pytest.mark.unit
def test_small_tokenizer_chat_template(tmp_path: Path) -> None:
    info = write_small_tokenizer(tmp_path, 1024)
    tok = _load(tmp_path)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == CHAT_TEXT
    ids = _chat_ids(tok)
    assert ids[0] == info.bos_token_id
    assert ids.count(info.bos_token_id) == 1
    assert ids.count(info.eot_token_id) == 2
    assert ids == tok.encode(CHAT_TEXT, add_special_tokens=False)
    no_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    assert no_prompt == CHAT_TEXT.removesuffix("Assistant: ")


@pytest.mark.unit
def test_small_tokenizer_is_deterministic(tmp_path: Path) -> None:
    write_small_tokenizer(tmp_path / "a", 2048)
    write_small_tokenizer(tmp_path / "b", 2048)
    for name in WRITTEN_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.unit
def test_small_tokenizer_files_are_json(tmp_path: Path) -> None:
    write_small_tokenizer(tmp_path / "nested" / "dir", 400)
    out = tmp_path / "nested" / "dir"
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["bos_token"] == "<|begin_of_text|>"
    assert config["eos_token"] == "<|end_of_text|>"
    assert config["clean_up_tokenization_spaces"] is False
    assert config["chat_template"] == CHAT_TEMPLATE
    special = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special["bos_token"]["content"] == "<|begin_of_text|>"
    assert special["eos_token"]["content"] == "<|end_of_text|>"
    json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.unit
@pytest.mark.parametrize("bad", [0, 255, 272, 299, -5, 512.0, True, "512"])
def test_small_tokenizer_rejects_bad_vocab_size(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ValueError, match="vocab_size must be an int >= 300"):
        write_small_tokenizer(tmp_path, bad)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
def test_llama3_missing_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):
        return None if name == "llama_models" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(tokenizer_files.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ImportError, match=r"pip install 'ternpool\[llama3\]'"):
        write_llama3_tokenizer(tmp_path)


@pytest.mark.unit
def test_llama3_tokenizer_ids(llama3_dir: tuple[Path, TokenizerInfo], llama3_tok) -> None:
    out, info = llama3_dir
    assert info == TokenizerInfo(vocab_size=128256, bos_token_id=128000, eos_token_id=128001,
                                 eot_token_id=128009)
    assert {p.name for p in out.iterdir()} == WRITTEN_FILES
    tok = llama3_tok
    assert len(tok) == 128256
    assert tok.bos_token_id == 128000
    assert tok.eos_token_id == 128001
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert tok.convert_ids_to_tokens(list(range(128000, 128256))) == LLAMA3_SPECIAL_TOKENS
    assert tok.encode("Hello world", add_special_tokens=False) == [9906, 1917]
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]
    assert tok.encode("Hello world") == [128000, 9906, 1917]


@pytest.mark.unit
def test_llama3_tokenizer_unicode_round_trip(llama3_tok) -> None:
    tok = llama3_tok
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    assert all(0 <= i < 128000 for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT


@pytest.mark.unit
def test_llama3_tokenizer_chat_template(llama3_tok) -> None:
    tok = llama3_tok
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == CHAT_TEXT
    ids = _chat_ids(tok)
    assert ids[0] == 128000
    assert ids.count(128000) == 1
    assert ids.count(128009) == 2
    assert ids[-1] == 220  # the space after "Assistant:" is its own token
    assert tok.decode(ids[-3:]) == "Assistant: "
    assert ids == tok.encode(CHAT_TEXT, add_special_tokens=False)
