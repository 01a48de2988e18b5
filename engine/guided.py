"""Structured output: a request's constraint (`response_format`, `guided_choice` or `guided_regex`) as an
llguidance matcher that says, before each token, which tokens may come next.

llguidance was chosen by measurement (tests/tools/structured_libs.py, numbers in the README): on Llama-3's
128k vocabulary its mask for 32 sequences took 0.49-0.88 ms a token in every run, xgrammar's 0.74-12 ms;
outlines-core's took 0.22-0.36 ms but its compiles 40-300 ms a schema against llguidance's 0.3-41 ms;
and llguidance needs no torch.
Each distinct constraint is compiled once per engine (keyed by its canonical JSON) and every sequence
gets a copy of the compiled matcher. Free whitespace inside JSON is off, so that a model cannot spend its
tokens on spaces.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .requests import SamplingParams


def constraint_key(params: SamplingParams) -> str | None:
    """The canonical JSON of a request's constraint, or None when it has none."""
    rf = params.response_format
    if rf is not None and rf.get("type") != "text":
        return json.dumps({"response_format": rf}, sort_keys=True, separators=(",", ":"))
    if params.guided_choice is not None:
        return json.dumps({"guided_choice": list(params.guided_choice)}, separators=(",", ":"))
    if params.guided_regex is not None:
        return json.dumps({"guided_regex": params.guided_regex})
    return None


def _grammar(constraint: dict[str, Any]) -> str:
    import llguidance

    options = {"whitespace_flexible": False}
    if "response_format" in constraint:
        rf = constraint["response_format"]
        schema = rf["json_schema"]["schema"] if rf["type"] == "json_schema" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
    if "guided_choice" in constraint:
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in constraint["guided_choice"]))
    return llguidance.LLMatcher.grammar_from_regex(constraint["guided_regex"])


def constraint_problem(params: SamplingParams) -> str | None:
    """Why the request's constraint does not compile ("FIELD: reason"), or None (also for no constraint).
    Needs no tokenizer: a job checks its job-wide constraint with it before any compute."""
    import llguidance

    key = constraint_key(params)
    if key is None:
        return None
    constraint = json.loads(key)
    try:
        problem = llguidance.LLMatcher.validate_grammar(_grammar(constraint))
    except Exception as e:  # llguidance raises ValueError/RuntimeError on a bad grammar
        problem = str(e)
    return f"{next(iter(constraint))}: {problem}" if problem else None


class Guide:
    """The constraints of one engine: its tokenizer as llguidance's, and a cache of compiled matchers."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids):
        self._hf, self.vocab_size, self.eos_ids = hf_tokenizer, vocab_size, sorted(eos_ids)
        self._tok = None
        self._compiled: dict[str, Any] = {}  # canonical JSON -> a fresh matcher to copy, or the error text

    def matcher(self, key: str):
        """A new matcher for the constraint `key` (from constraint_key); ValueError naming the field
        when the constraint does not compile (a bad schema or regex)."""
        import llguidance
        import llguidance.hf

        if self._tok is None:
            self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=max(self.vocab_size, len(self._hf)),
                                                   eos_token=self.eos_ids or None)
        if key not in self._compiled:
            constraint = json.loads(key)
            field = next(iter(constraint))
            try:
                m = llguidance.LLMatcher(self._tok, _grammar(constraint), log_level=0)
                self._compiled[key] = f"{field}: {m.get_error()}" if m.is_error() else m
            except Exception as e:  # llguidance raises ValueError/RuntimeError on a bad grammar
                self._compiled[key] = f"{field}: {e}"
        compiled = self._compiled[key]
        if isinstance(compiled, str):
            raise ValueError(compiled)
        return compiled.deep_copy()

    def mask(self, matcher, logits: np.ndarray) -> np.ndarray:
        """`logits` (vocab,) with every token the matcher forbids set to -inf (a copy)."""
        import llguidance.numpy as lln

        n = logits.shape[0]
        bits = lln.allocate_token_bitmask(1, self._tok.vocab_size)
        lln.fill_next_token_bitmask(matcher, bits, 0)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:n].astype(bool)
        out = np.full_like(logits, -np.inf)
        out[allowed] = logits[allowed]
        return out
