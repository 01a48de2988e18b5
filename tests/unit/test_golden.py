"""Golden tokens, as llama2.c's test: a fixed seeded model, fixed ids in, fixed ids out.

Needs no torch, so a run without the test extra still checks the numbers end to end: the model
generator, the native conversion (both weight formats), every kernel of the forward pass, the bf16
output head and greedy decoding through the real `Engine`.

GOLDEN is what this code generated, and what transformers' own BitNet in float32 generates on the
same model (logits within 4e-6 of ours): `test_transformers_generates_the_golden_tokens` checks that
where torch is installed. The seed, prompt and length were chosen so that at every step the top-1 logit
leads the top-2 by at least 0.66 (asserted: MIN_MARGIN), far above float noise (~1e-6) and above what
one int8 activation landing on the other side of a rounding boundary moves a logit (< 0.4, see
test_parity.py). So the tokens do not depend on the CPU: the integer kernels are exact, and the logits
were bit-identical with TERNPOOL_ISA=avx2 and generic, with 1 and 2 threads, and with 2bit and
1.6bit weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.model import BitNetModel
from ternpool.engine.modelgen import make_model

pytestmark = pytest.mark.unit

SEED = 0
# sha256 of the generated model.safetensors: make_model is deterministic for a seed, on any machine
MODEL_SHA256 = "b6c03bb34015fee66afe9406a9a3d0c0f39d856ab84724cefd3a8538349a955d"
PROMPT = [496, 207, 238, 352, 435, 35, 457]  # bos, then six ids of the 512-token vocabulary
GOLDEN = (333, 252, 333, 195, 10, 441, 366, 90, 85, 15, 11, 90)
MIN_MARGIN = 0.5  # top-1 minus top-2 logit, at every step (measured: 0.664 at the closest step)


@pytest.fixture(scope="module")
def golden_model(tmp_path_factory) -> str:
    return str(make_model(tmp_path_factory.mktemp("golden") / "tiny", "tiny", seed=SEED))


def _greedy(engine: Engine) -> tuple[int, ...]:
    (res,) = engine.generate([Request("golden", prompt_token_ids=PROMPT,
                                      params=SamplingParams(max_tokens=len(GOLDEN)))])
    assert res.error is None and res.finish_reason == "length", res
    return res.token_ids


def test_the_model_generator_is_deterministic(golden_model):
    with open(f"{golden_model}/model.safetensors", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == MODEL_SHA256


@pytest.mark.parametrize("weights_format", ["2bit", "1.6bit"])
def test_greedy_generation_gives_the_golden_tokens(golden_model, weights_format):
    engine = Engine.load(golden_model, slots=2, max_context=64, weights_format=weights_format, head="bf16")
    assert _greedy(engine) == GOLDEN


def test_every_golden_step_leads_by_a_wide_margin(golden_model):
    """Teacher-forced on PROMPT + GOLDEN: the argmax is the golden token and no step is a near-tie."""
    engine = Engine.load(golden_model, slots=1, max_context=64, head="bf16")
    ids = PROMPT + list(GOLDEN)
    model = BitNetModel(engine.model.weights, slots=1, max_context=len(ids), head="bf16")
    logits = model.forward(np.array(ids), np.arange(len(ids)), np.zeros(len(ids), int),
                           np.arange(len(PROMPT) - 1, len(ids) - 1))  # (steps, vocab)
    assert tuple(int(t) for t in logits.argmax(axis=1)) == GOLDEN
    top2 = np.sort(logits, axis=1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    assert margins.min() >= MIN_MARGIN, np.round(margins, 3)


def test_transformers_generates_the_golden_tokens(golden_model):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(golden_model, dtype=torch.float32)
    model.to(torch.float32)  # from_pretrained leaves embeddings and norms in bf16
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=len(GOLDEN), min_new_tokens=len(GOLDEN),
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tuple(out[0, len(PROMPT):].tolist()) == GOLDEN
