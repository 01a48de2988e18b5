"""The prefix cache: the block pool's bookkeeping, and an engine that reuses the blocks of shared prompt
prefixes computes bit for bit what an engine without it computes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ternpool.engine import Engine, Request, SamplingParams
from ternpool.engine.blocks import BlockPool, prefix_hashes
from ternpool.engine.model import BitNetModel
from ternpool.engine.options import KV_BLOCK_TOKENS

pytestmark = pytest.mark.unit
B = KV_BLOCK_TOKENS


def test_prefix_hashes_name_a_block_by_every_token_before_its_end():
    a = prefix_hashes(list(range(50)), 16)
    assert len(a) == 3 and len(set(a)) == 3
    assert prefix_hashes(list(range(48)) + [7, 7], 16) == a  # the partial block is not named
    b = prefix_hashes([99] + list(range(1, 50)), 16)  # the first token differs: every name differs
    assert not set(a) & set(b)
    c = prefix_hashes(list(range(32)) + [5] * 16, 16)
    assert c[:2] == a[:2] and c[2] != a[2]


def test_pool_shares_named_blocks_and_evicts_the_least_recently_used():
    pool = BlockPool(3)
    x, y, z = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted((x, y, z)) == [0, 1, 2] and pool.free == 0
    with pytest.raises(RuntimeError, match="every KV block is in use"):
        pool.allocate()
    pool.name(x, b"x")
    pool.name(y, b"y")
    pool.name(z, b"x")  # a second block of the same name: not cached
    assert pool.lookup(b"x") == x and pool.refs[x] == 2
    for b in (x, x, y, z):
        pool.release(b)
    assert pool.free == 3 and pool.cached == 2  # x and y idle in the cache, z free
    assert pool.allocate() == z  # a free block before any cached one
    assert pool.lookup(b"y") == y  # taken back from the cache: no longer idle
    assert pool.allocate() == x and pool.evictions == 1  # x was the least recently used idle block
    assert not pool.has(b"x") and pool.lookup(b"x") is None and pool.has(b"y")
    pool.release(y)
    pool.forget()
    assert pool.cached == 0 and pool.free == 1


def test_pool_without_caching_names_nothing():
    pool = BlockPool(2, caching=False)
    b = pool.allocate()
    pool.name(b, b"x")
    pool.release(b)
    assert pool.cached == 0 and pool.lookup(b"x") is None and pool.free == 2


def _engine(base: Engine, prefix_cache: bool, slots: int = 4, max_context: int = 256, step_tokens: int = 64):
    model = BitNetModel(base.model.weights, slots=slots, max_context=max_context)
    return Engine(model, base.tokenizer, base.threads, step_tokens=step_tokens, prefix_cache=prefix_cache)


def _requests(seed: int = 0) -> list[Request]:
    """Prompts as token ids: three shared instructions of 0.5 to 4 blocks plus tails of 0 to 40 tokens
    (some prompts exactly a shared prefix, some repeated whole), greedy and sampled, some asking for
    logprobs, one scoring its prompt."""
    rng = np.random.default_rng(seed)
    heads = [list(rng.integers(5, 250, n)) for n in (3 * B, 2 * B + 5, B // 2, 4 * B)]
    reqs = []
    for i in range(28):
        head = heads[i % len(heads)]
        tail = list(rng.integers(5, 250, int(rng.integers(0, 40))))
        ids = [int(t) for t in head + tail] if i % 7 != 3 else [int(t) for t in heads[0]]
        params = SamplingParams(max_tokens=int(rng.integers(1, 12)), temperature=0.0 if i % 3 else 0.8, seed=i,
                                logprobs=i % 4 == 0, top_logprobs=2 if i % 8 == 0 else 0,
                                prompt_logprobs=1 if i == 9 else None)
        reqs.append(Request(i, prompt_token_ids=ids, params=params))
    return reqs


def _same(a, b):
    assert [r.key for r in a] == [r.key for r in b]
    for x, y in zip(a, b):
        assert replace(x, time_to_first_token=None, latency=None, cached_tokens=0) == \
            replace(y, time_to_first_token=None, latency=None, cached_tokens=0), x.key


@pytest.mark.parametrize("slots, step_tokens", [(4, 64), (3, 7), (8, 512)])
def test_prefix_cache_changes_no_bit_of_any_result(tiny_engine, slots, step_tokens):
    """A mixed batch (shared prefixes of several lengths, whole repeated prompts, sampled rows, logprobs,
    prompt scoring) gives exactly the same results with the prefix cache as without, whatever the slots
    and the prefill chunks; with it, most prompt tokens come from the cache."""
    reqs = _requests()
    want = _engine(tiny_engine, False, slots, step_tokens=step_tokens).generate(reqs)
    engine = _engine(tiny_engine, True, slots, step_tokens=step_tokens)
    got = engine.generate(reqs)
    _same(got, want)
    assert all(r.cached_tokens == 0 for r in want)
    assert got[9].cached_tokens == 0  # a prompt that is scored is computed whole
    prompt = sum(r.prompt_tokens for r in got)
    assert sum(r.cached_tokens for r in got) == engine.cached_tokens > prompt // 3, (engine.cached_tokens, prompt)
    assert engine.prompt_tokens == prompt
    assert all(r.cached_tokens % B == 0 and r.cached_tokens < r.prompt_tokens for r in got)
    assert engine.blocks.free == engine.model.blocks  # every block given back (named ones idle in the cache)
    _same(engine.generate(reqs), want)  # a second pass: every shared block is already cached


def test_eviction_keeps_results_exact(tiny_engine):
    """A pool that cannot keep every prefix (2 slots of 64 positions: 8 blocks) evicts the least recently
    used blocks and recomputes them; nothing changes."""
    reqs = _requests(seed=1)
    reqs = [r for r in reqs if len(r.prompt_token_ids) + r.params.max_tokens <= 64]
    want = _engine(tiny_engine, False, slots=2, max_context=64).generate(reqs)
    engine = _engine(tiny_engine, True, slots=2, max_context=64)
    _same(engine.generate(reqs), want)
    assert engine.blocks.evictions > 0 and engine.cached_tokens > 0


def test_a_prefix_being_written_is_waited_for_not_computed_twice(tiny_engine):
    """Four prompts with the same 5-block instruction arrive together: one computes the instruction,
    the others wait for its blocks and compute only their own tails."""
    rng = np.random.default_rng(3)
    head = [int(t) for t in rng.integers(5, 250, 5 * B)]
    reqs = [Request(i, prompt_token_ids=head + [int(t) for t in rng.integers(5, 250, 9)],
                    params=SamplingParams(max_tokens=3)) for i in range(4)]
    engine = _engine(tiny_engine, True, slots=4, step_tokens=512)
    fed = []
    got = list(engine.stream(reqs, on_step=fed.append))
    assert sorted(r.cached_tokens for r in got) == [0, 5 * B, 5 * B, 5 * B]
    assert sum(fed) == 5 * B + 4 * 9 + 4 * 2  # the instruction once, each tail, the decode steps
    _same(sorted(got, key=lambda r: r.key), _engine(tiny_engine, False).generate(reqs))


def test_waiting_requests_with_a_cached_prefix_go_first(tiny_engine):
    """With one slot, after a prompt of instruction A, the waiting prompts of instruction A are admitted
    before the earlier ones of instruction B."""
    rng = np.random.default_rng(4)
    a, b = ([int(t) for t in rng.integers(5, 250, 3 * B)] for _ in range(2))
    order = ["a0", "b1", "b2", "a3", "a4"]
    reqs = [Request(k, prompt_token_ids=(a if k[0] == "a" else b) + [int(rng.integers(5, 250))],
                    params=SamplingParams(max_tokens=1)) for k in order]
    engine = _engine(tiny_engine, True, slots=1)
    assert [r.key for r in engine.stream(iter(reqs))] == ["a0", "a3", "a4", "b1", "b2"]
    off = _engine(tiny_engine, False, slots=1)
    assert [r.key for r in off.stream(iter(reqs))] == order


def test_a_request_passed_over_too_often_goes_next(tiny_engine):
    """Prefix-first admission cannot starve a request: one passed over `lookahead` (16) times is admitted."""
    rng = np.random.default_rng(5)
    a, b = ([int(t) for t in rng.integers(5, 250, 3 * B)] for _ in range(2))

    def source():
        yield Request("a", prompt_token_ids=a + [7], params=SamplingParams(max_tokens=1))
        yield Request("b", prompt_token_ids=b + [7], params=SamplingParams(max_tokens=1))
        for i in range(40):
            yield Request(f"a{i}", prompt_token_ids=a + [8 + i], params=SamplingParams(max_tokens=1))

    engine = _engine(tiny_engine, True, slots=1)
    keys = [r.key for r in engine.stream(source())]
    assert sorted(keys) == sorted(["a", "b"] + [f"a{i}" for i in range(40)])
    assert engine.lookahead == 16 and keys.index("b") == 1 + 16  # passed over by 16 rows of a, then admitted


def test_a_stream_closed_early_gives_its_blocks_back(tiny_engine):
    engine = _engine(tiny_engine, True)
    it = engine.stream(_requests())
    next(it)
    it.close()
    assert engine.blocks.free == engine.model.blocks and engine.running == 0
    _same(engine.generate(_requests()), _engine(tiny_engine, False).generate(_requests()))


def test_writing_the_cache_around_the_engine_empties_its_prefix_cache(tiny_engine):
    """A direct model call writes blocks through the model's own slotted table: the engine forgets what its
    blocks held instead of handing out overwritten ones."""
    engine = _engine(tiny_engine, True)
    reqs = _requests()
    want = engine.generate(reqs)
    assert engine.blocks.cached > 0
    n = 200
    engine.model.forward(np.arange(5, 5 + n), np.arange(n), np.zeros(n, np.int64))  # slot 0 = blocks 0..12
    _same(engine.generate(reqs), want)
