"""Token log-probabilities: generated (`logprobs`, `top_logprobs`) and prompt (`prompt_logprobs`),
against transformers' own BitNet in float32 (teacher forced, before the first int8 rounding flip: see
test_parity.py), the same whatever shares the batch or how the prefill is chunked, scoring-only
requests (max_tokens 0), and the output columns of a job."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.logprobs import log_softmax, top_ids
from ternpool.engine.model import BitNetModel
from ternpool.engine.requests import SamplingValueError

from helpers import run_one_shard

pytestmark = pytest.mark.unit

PROMPTS = ["The cat sat on the mat because", "Hello world", "x", "Once upon a time there was a king who"]
FLIP_ATOL = 1e-3  # logits closer than this to the oracle's: no int8 rounding flip upstream yet
LOGPROB_ATOL = 1e-4


def _engine(base: Engine, slots: int = 4, step_tokens: int = 512, head: str | None = None) -> Engine:
    model = BitNetModel(base.model.weights, slots=slots, max_context=256, head=head or base.model.head)
    return Engine(model, base.tokenizer, base.threads, step_tokens=step_tokens)


def _as_tuples(lps):
    return None if lps is None else [(t.token_id, t.token, t.logprob, [(a.token_id, a.token, a.logprob)
                                                                        for a in t.top]) for t in lps]


@pytest.mark.parametrize("kwargs, field", [
    ({"top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2.0}, "top_logprobs"), ({"logprobs": 1}, "logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1, "prompt_logprobs": 0}, "max_tokens")])
def test_impossible_logprob_settings_name_their_field(kwargs, field):
    with pytest.raises(SamplingValueError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_top_logprobs_implies_logprobs_and_max_tokens_0_needs_prompt_logprobs():
    assert SamplingParams(top_logprobs=3).logprobs is True
    assert SamplingParams().logprobs is False
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


def test_log_softmax_and_top_ids():
    row = np.array([1.0, 3.0, 3.0, -2.0, 0.5], np.float32)
    lp = log_softmax(row)
    assert lp.dtype == np.float64 and math.isclose(np.exp(lp).sum(), 1.0, rel_tol=1e-12)
    assert list(top_ids(lp, 3)) == [1, 2, 0]  # ties: the smaller id first
    assert list(top_ids(lp, 0)) == [] and len(top_ids(lp, 9)) == 5
    with pytest.raises(ValueError, match="non-finite"):
        log_softmax(np.array([0.0, np.nan], np.float32))


@pytest.mark.parametrize("variant", ["tiny-packed-auto", "odd-bf16-auto"])
def test_prompt_and_generated_logprobs_match_transformers(variant, model_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path = model_factory(variant)
    engine = Engine.load(path, slots=2, max_context=256, head="bf16")
    ids = engine.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[3])
    params = SamplingParams(max_tokens=12, logprobs=True, top_logprobs=5, prompt_logprobs=5)
    (res,) = engine.generate([Request(0, prompt_token_ids=ids, params=params)])
    assert res.error is None and len(res.logprobs) == len(res.token_ids) >= 1
    assert len(res.prompt_logprobs) == len(ids) and res.prompt_logprobs[0].logprob is None
    full = list(ids) + list(res.token_ids)
    ours = list(res.prompt_logprobs[1:]) + list(res.logprobs)  # ours[i]: the token at position i + 1

    oracle = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.float32).eval()
    with torch.no_grad():
        ref_logits = oracle(torch.tensor([full])).logits[0].numpy()  # teacher forced
    ref = torch.log_softmax(torch.tensor(ref_logits, dtype=torch.float64), dim=-1).numpy()
    got_logits = engine.model.forward(np.array(full), np.arange(len(full)), np.zeros(len(full), int))
    diff = np.abs(got_logits - ref_logits).max(axis=1)
    flip = next((i for i, d in enumerate(diff) if d > FLIP_ATOL), len(full))
    compared = min(flip, len(full) - 1)
    assert compared >= 8, f"an int8 flip at position {flip} leaves too little to compare"
    for i in range(compared):
        t = ours[i]
        assert t.token_id == full[i + 1]
        assert abs(t.logprob - ref[i, full[i + 1]]) <= LOGPROB_ATOL, i
        ref_top = np.argsort(-ref[i], kind="stable")[:6]
        gaps = -np.diff(ref[i, ref_top])
        if gaps.min() > 10 * LOGPROB_ATOL:  # no near-tie inside the top 5 or at its edge
            assert [a.token_id for a in t.top] == list(ref_top[:5]), i
        for a in t.top:
            assert abs(a.logprob - ref[i, a.token_id]) <= LOGPROB_ATOL
    print(f"LOGPROBS {variant}: {compared} of {len(full) - 1} positions compared, "
          f"max |diff| {max(abs(ours[i].logprob - ref[i, full[i + 1]]) for i in range(compared)):.2e}")


def test_top_lists_are_sorted_and_hold_the_sampled_token(tiny_engine):
    params = SamplingParams(max_tokens=20, temperature=1.2, seed=3, top_logprobs=4)
    greedy = SamplingParams(max_tokens=20, top_logprobs=4)
    sampled, argmax = tiny_engine.generate([Request(0, prompt=PROMPTS[0], params=params),
                                            Request(1, prompt=PROMPTS[0], params=greedy)])
    # the raw distribution, not the one after temperature: the first position is the same in both runs
    assert sampled.logprobs[0].top == argmax.logprobs[0].top
    seen_outside = False
    for res, is_greedy in ((sampled, False), (argmax, True)):
        assert [t.token_id for t in res.logprobs] == list(res.token_ids)
        for t in res.logprobs:
            tops = [a.logprob for a in t.top]
            assert len(t.top) == 4 and tops == sorted(tops, reverse=True) and tops[0] <= 0.0
            assert t.token == tiny_engine.tokenizer.decode([t.token_id])
            in_top = [a for a in t.top if a.token_id == t.token_id]
            if in_top:
                assert in_top[0].logprob == t.logprob
            else:
                assert t.logprob <= tops[-1]
                seen_outside = True
            if is_greedy:
                assert t.top[0].token_id == t.token_id
    assert seen_outside or sampled.token_ids != argmax.token_ids  # the sampled run did sample


def test_logprobs_are_bit_identical_whatever_shares_the_batch(tiny_engine):
    params = SamplingParams(max_tokens=10, top_logprobs=3, prompt_logprobs=2)
    alone = [tiny_engine.generate([Request(i, prompt=p, params=params)])[0] for i, p in enumerate(PROMPTS)]
    crowd = tiny_engine.generate([Request(i, prompt=p, params=params) for i, p in enumerate(PROMPTS)]
                                 + [Request("plain", prompt="Why?", params=SamplingParams(max_tokens=8))])
    for a, b in zip(alone, crowd):
        assert _as_tuples(a.logprobs) == _as_tuples(b.logprobs)
        assert _as_tuples(a.prompt_logprobs) == _as_tuples(b.prompt_logprobs)
    assert crowd[-1].logprobs is None and crowd[-1].prompt_logprobs is None


@pytest.mark.parametrize("slots, step_tokens", [(1, 3), (3, 5), (2, 1)])
def test_prompt_logprobs_over_a_chunked_prefill_equal_the_unchunked(tiny_engine, slots, step_tokens):
    params = SamplingParams(max_tokens=4, top_logprobs=1, prompt_logprobs=3)
    reqs = [Request(i, prompt=p, params=params) for i, p in enumerate(PROMPTS)]
    ref = _engine(tiny_engine).generate(reqs)
    got = _engine(tiny_engine, slots, step_tokens).generate(reqs)
    for a, b in zip(ref, got):
        assert len(a.prompt_logprobs) == a.prompt_tokens
        assert [t.token_id for t in a.prompt_logprobs] == list(a.prompt_token_ids)
        assert _as_tuples(a.prompt_logprobs) == _as_tuples(b.prompt_logprobs)
        assert _as_tuples(a.logprobs) == _as_tuples(b.logprobs)


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(tiny_engine):
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)
    gen = SamplingParams(max_tokens=3, prompt_logprobs=0)
    scored, generated = _engine(tiny_engine, step_tokens=4).generate(
        [Request(0, prompt=PROMPTS[3], params=score), Request(1, prompt=PROMPTS[3], params=gen)])
    assert (scored.text, scored.token_ids, scored.completion_tokens, scored.finish_reason) == ("", (), 0, "length")
    assert scored.error is None and scored.logprobs is None
    assert _as_tuples(scored.prompt_logprobs) == _as_tuples(generated.prompt_logprobs)
    assert all(t.top == () for t in scored.prompt_logprobs)
    assert all(t.logprob < 0 for t in scored.prompt_logprobs[1:])


def test_a_job_writes_the_logprob_columns(tmp_path, tiny_engine):
    from ternpool.jobs import read_output
    from ternpool.jobs.output import OUTPUT_SCHEMA_FIELDS

    _, results, spec = run_one_shard(tmp_path, {
        "prompt": ["Hello", "World wide", "Bye", "Again"],
        "top_logprobs": pa.array([2, None, 0, 25.0], pa.float64()),
        "logprobs": pa.array([None, True, None, None], pa.bool_()),
        "prompt_logprobs": pa.array([None, None, 1, None], pa.int64()),
        "max_tokens": pa.array([3, 2, 0, 2], pa.int64())}, tiny_engine)
    out = read_output(spec.output)
    for name, arrow_type in OUTPUT_SCHEMA_FIELDS:
        assert out.schema.field(name).type == arrow_type
    rows = out.to_pylist()
    first = rows[0]["generated_logprobs"]
    assert len(first) == 3 and all(len(t["top_logprobs"]) == 2 for t in first)
    assert [t["token_id"] for t in first] == [t.token_id for t in results[0].logprobs]
    assert first[0]["logprob"] == pytest.approx(results[0].logprobs[0].logprob, rel=1e-6)  # float32
    assert len(rows[1]["generated_logprobs"]) == 2 and rows[1]["generated_logprobs"][0]["top_logprobs"] == []
    assert rows[0]["prompt_token_logprobs"] is None and rows[1]["prompt_token_logprobs"] is None
    scored = rows[2]["prompt_token_logprobs"]
    assert rows[2]["generated_logprobs"] is None and rows[2]["completion_tokens"] == 0
    assert len(scored) == rows[2]["prompt_tokens"] and scored[0]["logprob"] is None
    assert all(t["logprob"] < 0 and len(t["top_logprobs"]) == 1 for t in scored[1:])
    assert rows[3]["error"] == "row 3: column 'top_logprobs': top_logprobs must be an integer in 0..20, got 25"


def test_logprob_defaults_are_part_of_a_jobs_identity_only_when_asked_for(tmp_path):
    from ternpool.jobs import JobSpec

    plain = JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), "model")
    assert set(plain.sampling_defaults()) == {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
    asked = JobSpec(str(tmp_path / "in"), str(tmp_path / "out"), "model",
                    sampling=SamplingParams(top_logprobs=2, prompt_logprobs=0))
    assert asked.sampling_defaults() == dict(plain.sampling_defaults(), logprobs=True, top_logprobs=2,
                                             prompt_logprobs=0)


def test_a_prompt_that_cannot_be_scored_fails_only_its_own_row(tiny_engine, monkeypatch):
    from ternpool.engine import engine as engine_mod

    real = engine_mod.token_logprob

    def failing(logits, token_id, k, text):
        if k == 7:  # the scored prompt's positions only
            raise ValueError("the model produced non-finite logits (max nan)")
        return real(logits, token_id, k, text)

    monkeypatch.setattr(engine_mod, "token_logprob", failing)
    bad, good = _engine(tiny_engine, step_tokens=3).generate([
        Request("bad", prompt=PROMPTS[3], params=SamplingParams(max_tokens=4, prompt_logprobs=7)),
        Request("good", prompt=PROMPTS[0], params=SamplingParams(max_tokens=4, top_logprobs=1))])
    assert bad.finish_reason == "error" and bad.error.startswith("ValueError: the model produced non-finite")
    assert bad.completion_tokens == 0
    assert good.error is None and good.completion_tokens == 4 and len(good.logprobs) == 4
