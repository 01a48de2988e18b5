"""Compare constrained-decoding libraries on a model's tokenizer (a command, not a test).

    python tests/tools/structured_libs.py MODEL_DIR [--seqs 32] [--steps 20]

For llguidance, xgrammar and outlines-core (each when importable): the tokenizer setup time, the
compile time of a small JSON schema (cold, first compile, plus one matcher per sequence) and the
per-token mask time for `--seqs` sequences each walking a valid document; and for each tricky schema
(nested objects, enums, arrays with minItems, a regex pattern) its compile time (to the first mask of
one sequence) and whether it accepts a valid document and refuses an invalid one. outlines-core
needs a byte-level BPE tokenizer (Llama-3's is one).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SMALL = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False}
SMALL_DOC = '{"name":"Ada Lovelace","age":36}'  # compact: every library is asked for no free whitespace
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


class OC:
    name = "outlines-core"

    def __init__(self, hf_tok):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        self.oc, self.regex = outlines_core, build_regex_from_schema
        # its Vocabulary maps each token's bytes to its ids; byte-level BPE spells bytes as characters.
        # Special tokens never match text, and the end token must be left out (it is allowed where the
        # regex accepts).
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        added = hf_tok.get_added_vocab()
        tokens: dict[bytes, list[int]] = {}
        for tok, i in hf_tok.get_vocab().items():
            if tok not in added and i != hf_tok.eos_token_id:
                tokens.setdefault(bytes(byte_of[c] for c in tok), []).append(i)
        self.vocab = outlines_core.Vocabulary(hf_tok.eos_token_id, tokens)
        self.n_vocab = len(hf_tok)

    def compile(self, schema):
        return self.oc.Index(self.regex(json.dumps(schema), whitespace_pattern=""), self.vocab)

    def matcher(self, grammar):
        return self.oc.Guide(grammar)

    def masks(self, matchers):
        bm = np.zeros((len(matchers), (self.n_vocab + 31) // 32), dtype=np.int32)
        for i, m in enumerate(matchers):
            m.write_mask_into(bm[i].ctypes.data, bm.shape[1], bm.itemsize)
        return bm

    def accepts(self, m, ids):
        for t in ids:
            if not m.accepts_tokens([t]):
                return False
            m.advance(t, return_tokens=False)
        return m.is_finished()

    def advance(self, m, t):
        m.advance(t, return_tokens=False)


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
    for cls in (LLG, XGR, OC):
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
                t0 = time.perf_counter()
                g = lib.compile(schema)
                lib.masks([lib.matcher(g)])  # llguidance and xgrammar finish some of the work lazily
                t_compile = time.perf_counter() - t0
                ok_good = lib.accepts(lib.matcher(g), hf(good, add_special_tokens=False)["input_ids"])
                ok_bad = lib.accepts(lib.matcher(g), hf(bad, add_special_tokens=False)["input_ids"])
                print(f"  {name}: compile to first mask {t_compile * 1e3:.1f} ms, valid accepted={ok_good}, invalid accepted={ok_bad}")
            except Exception as e:
                print(f"  {name}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
