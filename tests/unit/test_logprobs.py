"""Token log-probabilities: generated (`logprobs`, `top_logprobs`) and prompt (`prompt_logprobs`),
against transformers' own BitNet in float32 (teacher forced, before the first int8 rounding flip: see
test_parity.py), the same whatever shares the batch or how the prefill is chunked, scoring-only
requests (max_tokens 0), and the output columns of a job. Processed logprobs (`logprobs_mode`
"processed"): exactly the log of the sampler's candidates' probabilities, -inf outside them, the raw
ones at temperature 0, no mass outside a structured-output mask, through the column and the flags."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.logprobs import log_softmax, processed, token_logprob, top_ids
from ternpool.engine.model import BitNetModel
from ternpool.engine.requests import JSON_LOGPROB_FLOOR, SamplingValueError, json_logprobs
from ternpool.engine.sampling import candidates, draw, make_rng, sample

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
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1, "prompt_logprobs": 0}, "max_tokens"),
    ({"logprobs_mode": "processed_logprobs"}, "logprobs_mode"), ({"logprobs_mode": ""}, "logprobs_mode"),
    ({"logprobs_mode": None}, "logprobs_mode"), ({"logprobs_mode": ["raw"]}, "logprobs_mode")])
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


# -- processed logprobs ----------------------------------------------------------------------------------

VOCAB = 3001  # odd, and large enough for top-p to grow past its first partition


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * 3).astype(np.float32)


def _text(i: int) -> str:
    return f"<{i}>"


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, top_logprobs=20),
    SamplingParams(temperature=1.3, top_p=0.5, top_logprobs=5),
    SamplingParams(temperature=0.5, top_k=3, top_logprobs=7),
    SamplingParams(temperature=1.0, top_logprobs=4)])
def test_processed_logprobs_are_the_log_of_the_candidates_probabilities(params):
    for seed in range(5):
        logits, rng = _logits(seed), make_rng(seed)
        token, drawn = draw(logits, params, rng)
        assert token == sample(logits, params, make_rng(seed))  # the same draw as the plain sampler
        ids, p = candidates(logits, params)
        np.testing.assert_array_equal(drawn[0], ids)
        np.testing.assert_array_equal(drawn[1], p)
        t = token_logprob(processed(logits, drawn), token, params.top_logprobs, _text)
        prob = dict(zip(ids.tolist(), p.tolist()))
        assert t.logprob == math.log(prob[token])  # exact: the very probabilities the draw used
        shown = min(params.top_logprobs, len(ids))
        best = sorted(prob, key=lambda i: (-prob[i], i))[:shown]
        assert [a.token_id for a in t.top[:shown]] == best
        assert [a.logprob for a in t.top[:shown]] == [math.log(prob[i]) for i in best]
        # past the candidates the list goes on with -inf, lowest ids first
        rest = [a.token_id for a in t.top[shown:]]
        assert all(a.logprob == -math.inf for a in t.top[shown:])
        assert rest == sorted(set(range(VOCAB)) - set(ids.tolist()))[:params.top_logprobs - shown]
        lp = processed(logits, drawn)
        outside = np.setdiff1d(np.arange(VOCAB), ids)
        assert np.all(lp[outside] == -np.inf) and math.isclose(np.exp(lp).sum(), 1.0, rel_tol=1e-12)
        if params.top_k:
            assert len(ids) <= params.top_k


def test_processed_at_temperature_0_is_the_raw_distribution():
    logits = _logits(3)
    token, drawn = draw(logits, SamplingParams(), make_rng(0))
    assert drawn is None and token == int(np.argmax(logits))
    np.testing.assert_array_equal(processed(logits, drawn), log_softmax(logits))  # bit for bit


def test_processed_logprobs_of_a_masked_row_put_no_mass_outside_the_mask():
    logits = _logits(4)
    allowed = np.zeros(VOCAB, bool)
    allowed[[5, 17, 400, 2999]] = True
    masked = np.where(allowed, logits, -np.inf).astype(np.float32)  # what Guide.mask returns
    for params in (SamplingParams(top_logprobs=6), SamplingParams(temperature=1.0, seed=1, top_logprobs=6),
                   SamplingParams(temperature=0.8, top_p=0.95, top_logprobs=6)):
        token, drawn = draw(masked, params, make_rng(2))
        lp = processed(masked, drawn)
        assert allowed[token] and np.all(lp[~allowed] == -np.inf)
        assert math.isclose(np.exp(lp[allowed]).sum(), 1.0, rel_tol=1e-12)
        top = token_logprob(lp, token, 6, _text).top
        assert {a.token_id for a in top[:4] if a.logprob > -math.inf} <= {5, 17, 400, 2999}


def test_json_logprobs_floor_minus_infinity():
    entries = [{"token_id": 1, "token": "a", "logprob": -0.25,
                "top_logprobs": [{"token_id": 1, "token": "a", "logprob": -0.25},
                                 {"token_id": 0, "token": "b", "logprob": -math.inf}]},
               {"token_id": 0, "token": "b", "logprob": None, "top_logprobs": []}]
    out = json_logprobs(entries)
    assert out[0]["logprob"] == -0.25 and out[1]["logprob"] is None
    assert [t["logprob"] for t in out[0]["top_logprobs"]] == [-0.25, JSON_LOGPROB_FLOOR] == [-0.25, -9999.0]
    assert entries[0]["top_logprobs"][1]["logprob"] == -math.inf  # the input is left as it was
    assert json_logprobs(None) is None


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_engine_processed_logprobs_follow_temperature_and_top_k_of_the_raw_ones(tiny_engine):
    base = dict(max_tokens=12, temperature=0.6, top_k=3, seed=5, top_logprobs=5)
    raw, proc = tiny_engine.generate([Request(0, prompt=PROMPTS[0], params=SamplingParams(**base)),
                                      Request(1, prompt=PROMPTS[0], params=SamplingParams(
                                          **base, logprobs_mode="processed"))])
    assert raw.token_ids == proc.token_ids  # the mode changes what is reported, never what is drawn
    for r, p in zip(raw.logprobs, proc.logprobs):
        # processed: softmax(raw / T) over the raw top 3, -inf for the 2 tokens after them
        assert [a.token_id for a in p.top[:3]] == [a.token_id for a in r.top[:3]]
        want = log_softmax(np.array([a.logprob for a in r.top[:3]]) / 0.6)
        np.testing.assert_allclose([a.logprob for a in p.top[:3]], want, atol=1e-9)
        assert [a.logprob for a in p.top[3:]] == [-math.inf, -math.inf]
        assert p.token_id in [a.token_id for a in p.top[:3]]
        assert p.logprob == next(a.logprob for a in p.top if a.token_id == p.token_id)
    greedy = dict(max_tokens=8, top_logprobs=3, prompt_logprobs=2)
    g_raw, g_proc = tiny_engine.generate([Request(0, prompt=PROMPTS[1], params=SamplingParams(**greedy)),
                                          Request(1, prompt=PROMPTS[1], params=SamplingParams(
                                              **greedy, logprobs_mode="processed"))])
    assert _as_tuples(g_raw.logprobs) == _as_tuples(g_proc.logprobs)  # greedy: the same distribution
    assert _as_tuples(g_raw.prompt_logprobs) == _as_tuples(g_proc.prompt_logprobs)  # prompts: always raw
    sampled_prompt = tiny_engine.generate([Request(1, prompt=PROMPTS[1], params=SamplingParams(
        **greedy, temperature=0.5, top_k=2, seed=1, logprobs_mode="processed"))])[0]
    assert _as_tuples(sampled_prompt.prompt_logprobs) == _as_tuples(g_raw.prompt_logprobs)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_constrained_rows_processed_logprobs_stay_inside_the_grammar(tiny_engine, temperature):
    choices = ("yes", "no", "maybe so")
    params = dict(guided_choice=choices, top_logprobs=20, temperature=temperature, seed=3)
    raw, proc = tiny_engine.generate([
        Request(0, prompt="a", params=SamplingParams(**params)),
        Request(1, prompt="a", params=SamplingParams(**params, logprobs_mode="processed"))])
    assert proc.text in choices and raw.token_ids == proc.token_ids
    eos = tiny_engine.stop_ids
    outside_seen = False
    for i, (r, p) in enumerate(zip(raw.logprobs, proc.logprobs)):
        before = tiny_engine.tokenizer.decode(list(proc.token_ids[:i]))
        finite = [a for a in p.top if a.logprob > -math.inf]
        assert p.token_id in [a.token_id for a in finite]
        for a in finite:  # every token with mass continues some choice (or ends a complete one)
            assert any(c.startswith(before + a.token) for c in choices) or a.token_id in eos \
                or before in choices, (before, a.token)
        if len(finite) < 20:  # the whole support is listed: it holds all the mass
            assert math.isclose(sum(math.exp(a.logprob) for a in finite), 1.0, rel_tol=1e-9)
        outside_seen |= any(not any(c.startswith(before + a.token) for c in choices) for a in r.top)
    assert outside_seen  # the raw lists, unmasked, do name tokens the grammar forbids


def test_cli_generate_logprobs_mode_and_its_json(tmp_path, tiny_model, capsys):
    from ternpool.cluster.cli import main

    common = ["generate", "--model", tiny_model, "--prompt", "Hello", "--max-tokens", "4", "--json",
              "--logprobs", "5", "--temperature", "0.9", "--top-k", "2", "--seed", "1"]
    assert main(common + ["--logprobs-mode", "processed"]) == 0
    out = _strict_json(capsys.readouterr().out)
    for t in out["logprobs"]:
        assert [a["logprob"] for a in t["top_logprobs"][2:]] == [JSON_LOGPROB_FLOOR] * 3
        assert all(a["logprob"] > JSON_LOGPROB_FLOOR for a in t["top_logprobs"][:2])
    assert main(common) == 0  # raw, the default: no floor anywhere
    raw = _strict_json(capsys.readouterr().out)
    assert raw["output_ids"] == out["output_ids"]
    assert all(a["logprob"] > JSON_LOGPROB_FLOOR for t in raw["logprobs"] for a in t["top_logprobs"])
    with pytest.raises(SystemExit):  # argparse's choices
        main(common + ["--logprobs-mode", "cooked"])
    assert "--logprobs-mode: invalid choice: 'cooked'" in capsys.readouterr().err


def test_a_job_takes_logprobs_mode_from_its_column_and_its_default(tmp_path, tiny_engine):
    from ternpool.jobs import JobSpec, read_output

    columns = {"prompt": ["Hello", "Hello", "Hello", "Hello"],
               "logprobs_mode": pa.array([None, "raw", "processed", "cooked"], pa.string())}
    common = dict(max_tokens=3, temperature=0.8, top_k=2, top_logprobs=3, seed=4)
    _, _, spec = run_one_shard(tmp_path, columns, tiny_engine,
                               sampling=SamplingParams(**common, logprobs_mode="processed"))
    assert spec.sampling_defaults()["logprobs_mode"] == "processed"
    assert "logprobs_mode" not in JobSpec("i", "o", "m", sampling=SamplingParams(**common)).sampling_defaults()
    rows = read_output(spec.output).to_pylist()
    assert rows[3]["error"] == ("row 3: column 'logprobs_mode': logprobs_mode must be one of raw, processed, "
                                "got 'cooked'")
    lists = [[[a["logprob"] for a in t["top_logprobs"]] for t in rows[i]["generated_logprobs"]] for i in range(3)]
    # rows 0 (the job's default) and 2 processed: -inf past the 2 candidates, kept as -inf in Parquet
    assert all(tops[2] == -math.inf for tops in lists[0] + lists[2])
    assert all(tops[2] > -math.inf for tops in lists[1])  # row 1 raw
