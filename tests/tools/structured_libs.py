"""Compare constrained-decoding libraries on a model's tokenizer (a command, not a test).

    python tests/tools/structured_libs.py MODEL_DIR [--seqs 32] [--steps 20]

For llguidance and xgrammar (and outlines-core when importable): compile time of a small JSON
schema (cold, first compile) and the per-token mask time for `--seqs` sequences each walking a
valid document, and whether each tricky schema (nested objects, enums, arrays with minItems, a regex
pattern) compiles and accepts a valid document / refuses an invalid one.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SMALL = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False}
SMALL_DOC = '{"name":"Ada Lovelace","age":36}'  # compact: both libraries are asked for no free whitespace
TRICKY = {
    "nested": ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "array",
               "items": {"type": "number"}}}, "required": ["b"]}}, "required": ["a"]},
               '{"a":{"b":[1,2.5]}}', '{"a":{"c":1}}'),
    "enum": ({"type": "object", "properties": {"c": {"enum": ["red", "green"]}}, "required": ["c"]},
             '{"c":"red"}', '{"c":"blue"}'),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1,2]", "[1]"),
    "pattern": ({"type": "object", "properties": {"z": {"type": "string", "pattern": "^[0-9]{3}-[a-z]+$"}},
                 "required": ["z"]}, '{"z":"123-abc"}', '{"z":"12-abc"}'),
}


class LLG:
    name = "llguidance"

    def __init__(self, hf_tok):
        import llguidance
        import llguidance.hf
        import llguidance.numpy as lln
        self.llg, self.lln = llguidance, lln
        self.tok = llguidance.hf.from_tokenizer(hf_tok)

    def compile(self, schema):
        return self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})

    def matcher(self, grammar):
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def masks(self, matchers):
        bm = self.lln.allocate_token_bitmask(len(matchers), self.tok.vocab_size)
        for i, m in enumerate(matchers):
            self.lln.fill_next_token_bitmask(m, bm, i)
        return bm

    def accepts(self, m, ids):
        for t in ids:
            if not m.consume_token(t):
                return False
        return m.is_accepting()

    def advance(self, m, t):
        m.consume_token(t)


class XGR:
    name = "xgrammar"

    def __init__(self, hf_tok):
        import xgrammar as xgr
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=len(hf_tok))
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab = len(hf_tok)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def masks(self, matchers):
        bm = self.xgr.allocate_token_bitmask(len(matchers), self.vocab)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bm, i)
        return bm

    def accepts(self, m, ids):
        for t in ids:
            if not m.accept_token(t):
                return False
        return m.is_completed()  # the document is complete (a stop token would be accepted)

    def advance(self, m, t):
        m.accept_token(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="tokens of the valid document to walk (at most)")
    a = ap.parse_args()
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(a.model)
    print(f"tokenizer: {len(hf)} tokens; {a.seqs} sequences")
    doc_ids = hf(SMALL_DOC, add_special_tokens=False)["input_ids"]
    for cls in (LLG, XGR):
        try:
            t0 = time.perf_counter()
            lib = cls(hf)
            t_tok = time.perf_counter() - t0
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
            continue
        t0 = time.perf_counter()
        g = lib.compile(SMALL)
        ms = [lib.matcher(g) for _ in range(a.seqs)]
        t_compile = time.perf_counter() - t0
        times = []
        for t in doc_ids[:a.steps]:
            t0 = time.perf_counter()
            lib.masks(ms)
            times.append(time.perf_counter() - t0)
            for m in ms:
                lib.advance(m, t)
        per_tok = np.median(times) * 1e3
        print(f"{lib.name}: tokenizer setup {t_tok * 1e3:.0f} ms, schema compile {t_compile * 1e3:.1f} ms, "
              f"masks for {a.seqs} seqs {per_tok:.3f} ms/token (median of {len(times)}), "
              f"{per_tok / a.seqs * 1e3:.1f} us per sequence-token")
        for name, (schema, good, bad) in TRICKY.items():
            try:
                g = lib.compile(schema)
                ok_good = lib.accepts(lib.matcher(g), hf(good, add_special_tokens=False)["input_ids"])
                ok_bad = lib.accepts(lib.matcher(g), hf(bad, add_special_tokens=False)["input_ids"])
                print(f"  {name}: valid accepted={ok_good}, invalid accepted={ok_bad}")
            except Exception as e:
                print(f"  {name}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
