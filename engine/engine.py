"""`Engine`: continuous batching of many requests over one model in one process.

A fixed number of cache slots; each step feeds one token of every decoding
sequence plus prefill chunks of newly admitted prompts through a single
forward pass. When a sequence finishes its slot is freed and the next
request is pulled from the caller's iterable, so short and long prompts do
not wait for each other. The KV cache is paged (engine/blocks.py): a prompt that
starts with the full blocks of one seen before takes them from the prefix cache
and computes only the rest; waiting requests whose prefix is cached are admitted
first. A request with a structured-output constraint
(`engine/guided.py`) has its own logits row masked before sampling; the
other rows of the step are untouched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ternpool.kernels import set_threads

from .config import ModelConfig, ModelFormatError
from .footprint import fit_problem
from .options import (DEFAULT_MAX_CONTEXT, DEFAULT_SLOTS, DEFAULT_STEP_TOKENS, KV_BLOCK_TOKENS, TRUNCATE_MODES,
                      EngineConfig)
from .shapes import kv_bytes_per_slot
from .hub import resolve_model_dir
from .model import BitNetModel
from .blocks import BlockPool, prefix_hashes
from .guided import Guide, constraint_key
from .logprobs import PROMPT_ROWS_PER_BLOCK, log_softmax, processed, token_logprob
from .requests import Request, Result, SamplingParams, TokenLogprob
from .sampling import draw, make_rng
from .tokenizer import Tokenizer
from .modelfiles import check_links
from .native import ensure_native, load_native, resolved_weights_format
from .validate import load_tokenizer

log = logging.getLogger(__name__)
_END = object()
# requests pulled ahead of the free slots (at least), so that those whose prompt prefix is cached can go
# first: rows of 4 interleaved instructions are all in a window of 16
LOOKAHEAD = 16


@dataclass
class _Seq:
    request: Request
    prompt_ids: list[int]
    rng: np.random.Generator
    slot: int = -1  # its row of the model's block table, once admitted
    fed: int = 0  # tokens already written to the cache
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    error: str | None = None  # why the sequence failed (finish "error")
    logprobs: list[TokenLogprob] | None = None  # of generated tokens, when the request asks
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt tokens, when the request asks
    matcher: object | None = None  # llguidance matcher of a constrained request (engine/guided.py)
    names: list[bytes] = field(default_factory=list)  # of the prompt's full blocks (engine/blocks.py)
    blocks: list[int] = field(default_factory=list)  # KV blocks it holds, in position order
    named: int = 0  # its first `named` blocks are named in the prefix cache (written whole, or taken from it)
    matching: bool = True  # nothing computed yet: it may still take cached blocks
    cached: int = 0  # prompt tokens taken from the prefix cache
    passed_over: int = 0  # times a later request was admitted before it

    @property
    def pending(self) -> list[int]:
        """Tokens not yet fed: the rest of the prompt, or the last sampled token."""
        if self.fed < len(self.prompt_ids):
            return self.prompt_ids[self.fed:]
        return self.generated[-1:]


def available_memory() -> int:
    """Bytes of memory available to new allocations on this machine (Linux), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_fits(model_dir, cfg: ModelConfig, weights_format: str, head: str, slots: int, max_context: int,
               memory: int | None = None, kv_cache: str = "f32") -> None:
    """Refuse, before anything is mapped or allocated, a model whose weights and KV cache (`slots` of
    them, `max_context` tokens each) cannot fit this machine's available memory (unknown: no check)."""
    memory = available_memory() if memory is None else memory
    problem = (fit_problem(cfg, weights_format, head, slots, max_context, memory, kv_cache=kv_cache)
               if memory > 0 else None)
    if problem:
        raise ModelFormatError(f"{model_dir}: does not fit this machine's available memory: {problem}")


def auto_slots(cfg: ModelConfig, max_context: int, memory: int | None = None, kv_cache: str = "f32") -> int:
    """DEFAULT_SLOTS, or fewer so that full KV caches (of dtype `kv_cache`) fit in half of the available
    memory."""
    memory = available_memory() if memory is None else memory
    if memory <= 0:
        return DEFAULT_SLOTS
    return max(1, min(DEFAULT_SLOTS, int(0.5 * memory // kv_bytes_per_slot(cfg, max_context, kv_cache))))


def context_length(cfg: ModelConfig, max_context: int | None) -> int:
    """The context of every slot: `max_context`, or DEFAULT_MAX_CONTEXT capped at the model's limit when
    None. ValueError naming both numbers when `max_context` exceeds the model's max_position_embeddings."""
    if not max_context:
        return min(DEFAULT_MAX_CONTEXT, cfg.max_position_embeddings)
    if max_context > cfg.max_position_embeddings:
        raise ValueError(f"max context {max_context} (--max-context / max_context=) is larger than the model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}; use at most "
                         f"{cfg.max_position_embeddings}")
    return max_context


class Engine:
    """One model, its tokenizer and a KV cache of `slots` sequences."""

    def __init__(self, model: BitNetModel, tokenizer: Tokenizer, threads: int,
                 step_tokens: int = DEFAULT_STEP_TOKENS, truncate: str = "error", prefix_cache: bool = True):
        if truncate not in TRUNCATE_MODES:
            raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
        self.model, self.tokenizer, self.threads = model, tokenizer, threads
        self.config: ModelConfig = model.config
        self.step_tokens = step_tokens
        self.truncate = truncate
        self.stop_ids = frozenset(self.config.eos_token_ids)
        self.running = 0  # sequences in the cache right now
        self._guide: Guide | None = None  # made on the first constrained request
        self.blocks = BlockPool(model.blocks, caching=prefix_cache)
        self.table = np.zeros_like(model.block_table)  # row s: the blocks of the sequence in slot s
        self._outside_writes = model.outside_writes  # the model's cache written without this engine's table
        self._writing: dict[bytes, _Seq] = {}  # names of prompt blocks being written, and by whom
        self.lookahead = max(model.slots, LOOKAHEAD)  # requests that may wait for a slot, for prefix-first admission
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache, over this engine's life
        self.prompt_tokens = 0  # prompt tokens of the sequences that ran
        self.load_seconds: dict[str, float] = {}  # set by `load`: where its time went

    @classmethod
    def load(cls, model: str | Path, config: EngineConfig | None = None, **options) -> "Engine":
        """Load a model directory (or Hub id) and allocate the cache, as `config` says (see
        `EngineConfig`; default: EngineConfig()). Keywords are EngineConfig fields that replace
        config's: `Engine.load(model, slots=4)`.

        A Hugging Face model is converted once into ternpool's native file under the config's
        cache_dir and mapped from there; a native directory is mapped as it is.
        """
        t0 = time.perf_counter()
        config = replace(config or EngineConfig(), **options)
        threads = set_threads(config.threads)
        head, weights_format = config.head, config.weights_format
        model_dir = resolve_model_dir(model)
        check_links(model_dir)
        cfg = ModelConfig.from_dir(model_dir)
        ctx = context_length(cfg, config.max_context)
        slots = config.slots
        check_fits(model_dir, cfg, resolved_weights_format(model_dir, weights_format), head, slots or 1, ctx,
                   kv_cache=config.kv_cache)
        native_dir = ensure_native(model_dir, weights_format, config.cache_dir)  # checks the source's tensor headers
        t1 = time.perf_counter()
        weights = load_native(native_dir, cfg)  # checks the native file's tensor headers
        t2 = time.perf_counter()
        tokenizer = load_tokenizer(native_dir, cfg)  # checks its files, its ids against vocab_size, the template
        t3 = time.perf_counter()
        if slots is None:
            slots = auto_slots(cfg, ctx, kv_cache=config.kv_cache)
        engine = cls(BitNetModel(weights, slots, ctx, head=head, kv_cache=config.kv_cache), tokenizer, threads,
                     config.step_tokens, config.truncate, config.prefix_cache)
        engine.load_seconds = {"convert_or_find": t1 - t0, "weights": t2 - t1, "tokenizer": t3 - t2,
                               "total": time.perf_counter() - t0}
        log.info("engine ready in %.2f s: %s (%s weights, %s head), %d slots x %d tokens (%s KV cache up to %.1f MB "
                 "a slot), %d threads", time.perf_counter() - t0, model_dir, weights.weights_format, head, slots, ctx,
                 config.kv_cache, engine.model.kv_bytes_per_slot / 1e6, threads)
        return engine

    # -- requests ------------------------------------------------------------------------------

    def _prompt_ids(self, req: Request) -> list[int]:
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise ValueError("a request needs exactly one of 'prompt', 'messages' or 'prompt_token_ids'")
        if req.prompt_token_ids is not None:
            ids = [int(t) for t in req.prompt_token_ids]
            if not ids or min(ids) < 0 or max(ids) >= self.config.vocab_size:
                raise ValueError(f"prompt_token_ids must be a non-empty list of ids in 0..{self.config.vocab_size - 1}")
            return ids
        if req.prompt is not None:
            if not isinstance(req.prompt, str) or not req.prompt:
                raise ValueError(f"prompt must be a non-empty string, got {req.prompt!r}")
            return self.tokenizer.encode(req.prompt)
        if not req.messages:
            raise ValueError("messages must be a non-empty list of {role, content}")
        return self.tokenizer.encode_chat(req.messages)

    def _admit(self, req: Request) -> _Seq | Result:
        """The request as a sequence waiting for a slot, or its failed Result: any exception while preparing
        one request (a chat template that raises, a tokenizer error, a bad value) is that request's
        error, never the batch's."""
        try:
            if not isinstance(req.params, SamplingParams):
                raise ValueError(f"params must be SamplingParams, got {type(req.params).__name__}")
            ids = self._prompt_ids(req)
            if len(ids) >= self.model.max_context and self.truncate == "left":
                ids = self._truncate_left(ids, req.params.max_tokens)
            rng = make_rng(req.params.seed)
            matcher = self._matcher(req.params)
        except ValueError as e:  # ours: the message says what is wrong with the request
            return Result.failed(req.key, str(e))
        except Exception as e:  # e.g. jinja2's TemplateError from the model's chat template
            log.warning("request %r failed while preparing its prompt: %s: %s", req.key, type(e).__name__, e)
            return Result.failed(req.key, f"{type(e).__name__}: {e}")
        if len(ids) >= self.model.max_context:
            return Result.failed(req.key, f"prompt too long: it has {len(ids)} tokens; the context holds "
                                          f"{self.model.max_context} including at least one generated token; "
                                          "--truncate left (truncate=\"left\" in Python) keeps its end",
                                 prompt_tokens=len(ids))
        seq = _Seq(req, ids, rng, matcher=matcher)
        if self.blocks.caching:
            seq.names = prefix_hashes(ids, KV_BLOCK_TOKENS)
        if req.params.logprobs:
            seq.logprobs = []
        if req.params.prompt_logprobs is not None:  # nothing predicts the first token
            seq.prompt_logprobs = [TokenLogprob(ids[0], self._token_text(ids[0]), None)]
        return seq

    def _matcher(self, params: SamplingParams):
        """A new matcher for the request's constraint, or None; ValueError for one that does not compile."""
        key = constraint_key(params)
        if key is None:
            return None
        if self._guide is None:
            self._guide = Guide(self.tokenizer.tok, self.config.vocab_size, self.stop_ids)
        return self._guide.matcher(key)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _truncate_left(self, ids: list[int], max_tokens: int) -> list[int]:
        """Keep the end of a prompt, leaving room for min(max_tokens, context / 2) new tokens."""
        keep = self.model.max_context - min(max_tokens, self.model.max_context // 2)
        if ids[0] == self.config.bos_token_id:
            return [ids[0]] + ids[len(ids) - keep + 1:]
        return ids[len(ids) - keep:]

    def _result(self, s: _Seq) -> Result:
        now = time.perf_counter()
        ttft = None if s.first_token_at is None else s.first_token_at - s.started
        return Result(s.request.key, s.text, tuple(s.generated), len(s.prompt_ids), len(s.generated),
                      s.finish or "length", s.error, tuple(s.prompt_ids), ttft, now - s.started,
                      None if s.logprobs is None else tuple(s.logprobs),
                      None if s.prompt_logprobs is None else tuple(s.prompt_logprobs), s.cached)

    def _accept(self, s: _Seq, token: int) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        p = s.request.params
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        s.generated.append(token)
        if s.matcher is not None:
            if not s.matcher.consume_token(token):
                raise ValueError(f"the constraint refused token {token}: {s.matcher.get_error()}")
            if s.matcher.is_stopped():  # the grammar is complete (an end token it accepted, or nothing more fits)
                s.finish = "stop"
                s.text = self.tokenizer.decode(s.generated[:-1] if token in self.stop_ids else s.generated)
                return
        if token in self.stop_ids:
            s.finish = "stop"
            s.text = self.tokenizer.decode(s.generated[:-1])
            return
        s.text = self.tokenizer.decode(s.generated)
        if p.stop:
            cut = min((i for i in (s.text.find(x) for x in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                s.text, s.finish = s.text[:cut], "stop"
                return
        if len(s.generated) >= p.max_tokens or len(s.prompt_ids) + len(s.generated) >= self.model.max_context:
            s.finish = "length"

    # -- the loop ------------------------------------------------------------------------------

    def stream(self, requests: Iterable[Request | None],
               on_step: Callable[[int], None] | None = None) -> Iterator[Result]:
        """Yield a `Result` for every request, in the order they finish.

        With the prefix cache on, requests are pulled ahead of the free slots, up to `lookahead` more
        (max(slots, LOOKAHEAD)); when a slot frees, the waiting request with the longest prompt prefix in
        the prefix cache takes it (arrival order among equals; one passed over `lookahead` times goes
        next). Without it, a request is pulled when a slot is free. The iterable may yield None for "nothing
        ready yet": the engine goes on with its running sequences and asks again after the next step
        (at once when nothing runs, so such a source should wait a little itself).
        `on_step(tokens)` is called after every forward pass.
        """
        set_threads(self.threads)  # Numba's thread count is per calling thread
        if self.model.outside_writes != self._outside_writes:  # someone wrote the cache around us
            self.blocks.forget()
            self._outside_writes = self.model.outside_writes
        source = iter(requests)
        free = deque(range(self.model.slots))
        waiting: deque[_Seq] = deque()
        active: list[_Seq] = []
        exhausted = False
        ahead = self.lookahead if self.blocks.caching else 0  # requests pulled beyond the free slots
        self.running = 0
        try:
            while True:
                while not exhausted and len(waiting) < len(free) + ahead:
                    req = next(source, _END)
                    if req is _END:
                        exhausted = True
                    elif req is None:
                        break
                    else:
                        seq = self._admit(req)
                        if isinstance(seq, Result):
                            yield seq
                        else:
                            waiting.append(seq)
                while free and waiting:
                    seq = self._next_waiting(waiting)
                    seq.slot = free.popleft()
                    active.append(seq)
                self.running = len(active)
                if not active:
                    if exhausted and not waiting:
                        return
                    continue
                finished, tokens = self._step(active)
                if on_step is not None:
                    on_step(tokens)
                for s in finished:
                    active.remove(s)
                    self._release(s)
                    free.append(s.slot)
                    self.running = len(active)
                    yield self._result(s)
        finally:  # a stream closed early (its consumer stopped, an exception) gives its blocks back
            for s in active:
                self._release(s)
            self.running = 0

    # -- the paged KV cache (engine/blocks.py) ---------------------------------------------------

    def _matchable(self, s: _Seq) -> int:
        """Blocks of its prompt a sequence may take from the prefix cache: full ones, leaving at least the
        last prompt token to compute (its logits give the first token); none when it scores its prompt."""
        if s.request.params.prompt_logprobs is not None:
            return 0
        return min(len(s.names), (len(s.prompt_ids) - 1) // KV_BLOCK_TOKENS)

    def _cached_prefix(self, s: _Seq) -> int:
        """Leading blocks of its prompt that the prefix cache holds or is being written now."""
        n = 0
        for name in s.names[:self._matchable(s)]:
            if not self.blocks.has(name) and name not in self._writing:
                break
            n += 1
        return n

    def _next_waiting(self, waiting: deque[_Seq]) -> _Seq:
        """Take the waiting sequence that goes next: the oldest if it has been passed over `lookahead` times,
        else the one with the longest cached prefix (the oldest among equals)."""
        if len(waiting) > 1 and self.blocks.caching and waiting[0].passed_over < self.lookahead:
            best = max(range(len(waiting)), key=lambda i: (self._cached_prefix(waiting[i]), -i))
            for i in range(best):
                waiting[i].passed_over += 1
            waiting.rotate(-best)
            seq = waiting.popleft()
            waiting.rotate(best)
            return seq
        return waiting.popleft()

    def _take_cached(self, s: _Seq) -> bool:
        """Give a sequence that has computed nothing yet the cached blocks its prompt starts with. False
        when its next block is being written by another sequence: it waits a step and takes it then."""
        limit = self._matchable(s)
        while len(s.blocks) < limit:
            b = self.blocks.lookup(s.names[len(s.blocks)])
            if b is None:
                owner = self._writing.get(s.names[len(s.blocks)])
                return owner is None or owner is s
            self.table[s.slot, len(s.blocks)] = b
            s.blocks.append(b)
            s.named += 1
            s.fed += KV_BLOCK_TOKENS
            s.cached += KV_BLOCK_TOKENS
        return True

    def _hold(self, s: _Seq, end: int) -> None:
        """Blocks for the sequence's positions up to `end` (exclusive); claims the full prompt blocks it
        is about to write, so that a sequence with the same prefix waits for them instead of computing
        them again."""
        while len(s.blocks) * KV_BLOCK_TOKENS < end:
            b = self.blocks.allocate()
            self.table[s.slot, len(s.blocks)] = b
            s.blocks.append(b)
        for i in range(s.fed // KV_BLOCK_TOKENS, min(len(s.names), -(-end // KV_BLOCK_TOKENS))):
            self._writing.setdefault(s.names[i], s)

    def _name_written(self, s: _Seq) -> None:
        """Name in the prefix cache the prompt blocks the sequence has now written whole."""
        full = min(len(s.names), s.fed // KV_BLOCK_TOKENS)
        for i in range(s.named, full):
            self.blocks.name(s.blocks[i], s.names[i])
            if self._writing.get(s.names[i]) is s:
                del self._writing[s.names[i]]
        s.named = max(s.named, full)

    def _release(self, s: _Seq) -> None:
        for name in s.names[s.named:]:
            if self._writing.get(name) is s:
                del self._writing[name]
        for b in s.blocks:
            self.blocks.release(b)
        s.blocks = []
        self.cached_tokens += s.cached
        self.prompt_tokens += len(s.prompt_ids)

    def _step(self, active: list[_Seq]) -> tuple[list[_Seq], int]:
        """One forward pass; returns the sequences that finished in it and the tokens it fed."""
        tokens: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        fed: list[_Seq] = []
        sampled: list[tuple[_Seq, int]] = []  # sequences that get a next token, and their logit row
        scored: list[tuple[_Seq, int, int]] = []  # (sequence, logit row, prompt token it predicts)
        done: list[_Seq] = []
        budget = self.step_tokens
        # decoding sequences first (one token each), then prefill chunks in arrival order
        for s in sorted(active, key=lambda s: s.fed < len(s.prompt_ids)):
            if s.matching and not self._take_cached(s):
                continue  # another sequence is writing its next prompt block
            chunk = s.pending
            if len(chunk) > 1:
                if budget <= 0:
                    continue
                chunk = chunk[:budget]
            s.matching = False
            self._hold(s, s.fed + len(chunk))
            fed.append(s)
            if s.prompt_logprobs is not None:  # rows of prompt positions that predict a prompt token
                scored.extend((s, len(tokens) + i, p + 1) for i, p in enumerate(range(s.fed, s.fed + len(chunk)))
                              if p + 1 < len(s.prompt_ids))
            tokens.extend(chunk)
            pos.extend(range(s.fed, s.fed + len(chunk)))
            slots.extend([s.slot] * len(chunk))
            s.fed += len(chunk)
            budget -= len(chunk)
            if s.fed >= len(s.prompt_ids):
                if s.request.params.max_tokens == 0:  # a scoring request: the prompt is all it reads
                    s.finish = "length"
                    done.append(s)
                else:
                    sampled.append((s, len(tokens) - 1))
        if not tokens:
            return done, 0
        rows = [row for _, row in sampled] + [row for _, row, _ in scored]
        hidden = self.model.hidden(np.array(tokens), np.array(pos), np.array(slots), np.array(rows, dtype=np.int64),
                                   self.table)
        for s in fed:
            self._name_written(s)
        if scored:
            self._score_prompts(scored, hidden[len(sampled):])
            for s in {id(s): s for s, _, _ in scored}.values():
                if s.finish == "error" and not any(s is d for d in done):
                    done.append(s)
        logits = self.model.logits(hidden[:len(sampled)])
        for (s, _), row in zip(sampled, logits):
            if s.finish == "error":  # its prompt could not be scored
                continue
            try:
                params, raw = s.request.params, row
                if s.matcher is not None:  # float logits of either head; the raw ones still give raw logprobs
                    row = self._guide.mask(s.matcher, row)
                token, drawn = draw(row, params, s.rng)
                if s.logprobs is not None:
                    lp = log_softmax(raw) if params.logprobs_mode == "raw" else processed(row, drawn)
                    s.logprobs.append(token_logprob(lp, token, params.top_logprobs, self._token_text))
                self._accept(s, token)
            except Exception as e:  # e.g. non-finite logits: this sequence fails, the others go on
                self._fail(s, f"at token {len(s.generated)}", e)
            if s.finish:
                done.append(s)
        return done, len(tokens)

    def _score_prompts(self, scored: list[tuple[_Seq, int, int]], hidden: np.ndarray) -> None:
        """Append the log-probability of each scored prompt token to its sequence (in position order;
        always of the raw distribution: no prompt token is sampled), turning `hidden` into logits a
        block of rows at a time."""
        for start in range(0, len(scored), PROMPT_ROWS_PER_BLOCK):
            block = scored[start:start + PROMPT_ROWS_PER_BLOCK]
            for (s, _, target), row in zip(block, self.model.logits(hidden[start:start + len(block)])):
                if s.finish == "error":
                    continue
                try:
                    s.prompt_logprobs.append(token_logprob(log_softmax(row), s.prompt_ids[target],
                                                           s.request.params.prompt_logprobs,
                                                           self._token_text))
                except Exception as e:
                    self._fail(s, f"at prompt token {target}", e)

    @staticmethod
    def _fail(s: _Seq, where: str, e: Exception) -> None:
        log.warning("request %r failed %s: %s: %s", s.request.key, where, type(e).__name__, e)
        s.finish, s.error = "error", f"{type(e).__name__}: {e}"

    def generate(self, requests: list[Request]) -> list[Result]:
        """Blocking: results in the order of `requests` (keys need not be unique)."""
        out: list[Result | None] = [None] * len(requests)
        for r in self.stream(replace(req, key=i) for i, req in enumerate(requests)):
            out[r.key] = replace(r, key=requests[r.key].key)
        return out  # type: ignore[return-value]
