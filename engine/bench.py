"""Model timings for `ternpool bench model`: prefill, time to first token, single-stream decode and
aggregate decode under continuous batching at several concurrencies, and peak memory."""

from __future__ import annotations

import logging
import resource
import time

import numpy as np

from .engine import Engine
from .model import BitNetModel
from .options import DEFAULT_HEAD
from .requests import Request, SamplingParams

log = logging.getLogger(__name__)


def random_prompts(engine: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    cfg = engine.config
    top = min(cfg.vocab_size, len(engine.tokenizer)) - 300  # ordinary tokens, not the special ones at the end
    return [[cfg.bos_token_id] + rng.integers(100, top, size=length - 1).tolist() for _ in range(n)]


def warm_up(engine: Engine, prompt_len: int, seed: int = 0) -> None:
    """One request of a prompt as long as the timed ones and two tokens: every kernel a timed run calls
    (a long prompt's tile kernels among them) is loaded and its first-call costs paid, as llama-bench's
    own warm-up run does."""
    timed_run(engine, random_prompts(engine, 1, prompt_len, seed), 2)


def timed_run(engine: Engine, prompts: list[list[int]], gen: int) -> dict:
    steps: list[tuple[float, int]] = []
    last = [time.perf_counter()]

    def on_step(tokens: int) -> None:
        now = time.perf_counter()
        steps.append((now - last[0], tokens))
        last[0] = now

    reqs = [Request(i, prompt_token_ids=p, params=SamplingParams(max_tokens=gen)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    last[0] = t0
    results = list(engine.stream(reqs, on_step=on_step))
    wall = time.perf_counter() - t0
    n = len(prompts)
    # decode-only steps: at most one token per sequence, so no prefill chunk is in them
    decode = [(dt, k) for dt, k in steps if k <= n]
    decode_time = sum(dt for dt, _ in decode)
    decode_tokens = sum(k for _, k in decode)
    return {"wall_s": wall, "generated": sum(r.completion_tokens for r in results),
            "ttft_s": float(np.mean([r.time_to_first_token for r in results])),
            "decode_tokens_per_s": decode_tokens / decode_time if decode_time else 0.0,
            "tokens_per_s": sum(r.completion_tokens for r in results) / wall, "steps": len(decode)}


def decode_ceiling(decode_tokens_per_s: float, bytes_per_token: int, read_bandwidth: float) -> dict:
    """Single-stream decode against the bandwidth ceiling: every weight byte is read once per token,
    so a decode of d tokens/s read at least d * bytes_per_token bytes/s, and bytes_per_token /
    read_bandwidth is the most it can do. A decode above that ceiling is impossible, so the bandwidth
    measurement was too low: then `fraction_of_ceiling` is None and `bandwidth_low_by` says by how much
    (decode's own bytes/s over the measured ones), never a fraction above 1.

    Returns {ceiling_tokens_per_s, decode_read_bytes_per_s, fraction_of_ceiling, bandwidth_low_by}."""
    if bytes_per_token <= 0 or read_bandwidth <= 0:
        raise ValueError(f"bytes per token and read bandwidth must be positive, got {bytes_per_token} and "
                         f"{read_bandwidth}")
    ceiling = read_bandwidth / bytes_per_token
    read = decode_tokens_per_s * bytes_per_token
    over = read > read_bandwidth
    return {"ceiling_tokens_per_s": ceiling, "decode_read_bytes_per_s": read,
            "fraction_of_ceiling": None if over else decode_tokens_per_s / ceiling,
            "bandwidth_low_by": read / read_bandwidth if over else None}


def _reset_peak_rss() -> bool:
    """Start this process's peak RSS (VmHWM, ru_maxrss) afresh (Linux: "5" into /proc/self/clear_refs),
    so that the peak `bench model` reports is the model's, not the bandwidth buffer's freed before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        log.warning("cannot reset the peak RSS (%s): the peak printed includes the bandwidth buffer", e)
        return False
    return True


def bench_model(model: str, threads: int | None = None, prompt_len: int = 128, gen: int = 128,
                concurrency=(1, 8, 32, 64), head: str = DEFAULT_HEAD, weights_format: str | None = None,
                seed: int = 0, kv_cache: str = "f32") -> dict:
    """`ternpool bench model`: the read bandwidth with the model's threads (measured first, before the
    model takes memory), load, prefill, single-stream decode against its ceiling (`decode_ceiling`),
    aggregate decode at each concurrency, peak RSS, and the kernel path that ran (`kernel_path`)."""
    from ternpool.kernels import set_threads
    from ternpool.kernels.bandwidth import read_bandwidth
    from ternpool.kernels.bench import kernel_path

    set_threads(threads)  # the bandwidth is read with the threads the model runs with
    bandwidth = read_bandwidth()
    rss_reset = _reset_peak_rss()  # the buffer is freed: the peak RSS below is the model's
    Engine.load(model, threads=threads, slots=1, max_context=8, weights_format=weights_format)  # convert once
    t0 = time.perf_counter()
    engine = Engine.load(model, threads=threads, slots=max(concurrency), max_context=prompt_len + gen + 1,
                         step_tokens=max(512, prompt_len), head=head, weights_format=weights_format,
                         kv_cache=kv_cache)
    load_s = time.perf_counter() - t0
    w = engine.model.weights
    head_bytes = w.head_q.nbytes + w.head_scale.nbytes if head == "int8" else w.embed.nbytes
    per_token = w.linear_bytes + head_bytes  # read once per decode step (norms and KV cache aside)
    engine.stop_ids = frozenset()  # random models may sample an end token: always generate `gen` tokens
    warm_up(engine, prompt_len, seed)
    single = timed_run(engine, random_prompts(engine, 1, prompt_len, seed + 1), gen)
    path = kernel_path()
    out = {"model": str(model), "threads": engine.threads, "head": head, "weights_format": w.weights_format,
           "isa": path["isa"], "kernel_path": path, "bytes_per_token": per_token, "slots": engine.model.slots,
           "kv_cache": kv_cache, "max_context": engine.model.max_context,
           "kv_bytes_per_slot": engine.model.kv_bytes_per_slot, "prompt_len": prompt_len, "gen": gen, "load_s": load_s,
           "load_weights_s": engine.load_seconds["weights"], "load_tokenizer_s": engine.load_seconds["tokenizer"], "prefill_tokens_per_s": prompt_len / single["ttft_s"], "ttft_s": single["ttft_s"],
           "decode_tokens_per_s": single["decode_tokens_per_s"], "read_bandwidth": bandwidth["bytes_per_s"],
           "bandwidth": bandwidth, **decode_ceiling(single["decode_tokens_per_s"], per_token, bandwidth["bytes_per_s"]),
           "concurrency": {}}
    for c in concurrency:
        r = timed_run(engine, random_prompts(engine, c, prompt_len, seed + 10 + c), gen)
        out["concurrency"][c] = {"aggregate_decode_tokens_per_s": r["decode_tokens_per_s"],
                                 "tokens_per_s_incl_prefill": r["tokens_per_s"], "wall_s": r["wall_s"]}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["peak_rss_includes_bandwidth_buffer"] = not rss_reset
    return out


def head_agreement(model: str, prompts: int = 8, prompt_len: int = 128, threads: int | None = None,
                   weights_format: str | None = None, seed: int = 0, gen: int = 32) -> dict:
    """Top-1 agreement of the int8 head with the exact bf16 head, at every position of random prompts
    (teacher-forced), with the time each head takes for those positions; then greedy generation of `gen`
    tokens from each prompt with either head: the step at which each pair first differs (None: never)."""
    engine = Engine.load(model, threads=threads, slots=prompts, max_context=prompt_len + gen,
                         weights_format=weights_format, head="bf16")
    m = engine.model
    agree = total = 0
    margins: list[float] = []
    times = {"bf16": 0.0, "int8": 0.0}
    for p in random_prompts(engine, prompts, prompt_len, seed):
        n = len(p)
        h = m.hidden(np.asarray(p), np.arange(n), np.zeros(n, np.int64))
        logits = {}
        for head in times:
            t0 = time.perf_counter()
            logits[head] = m.logits(h, head)
            times[head] += time.perf_counter() - t0
        exact = logits["bf16"]
        top = exact.argmax(axis=1)
        same = top == logits["int8"].argmax(axis=1)
        agree += int(same.sum())
        total += n
        srt = np.sort(exact, axis=1)
        margins += (srt[:, -1] - srt[:, -2])[~same].tolist()  # how close the exact top-2 were on misses
    first_difference = _greedy_divergence(engine, random_prompts(engine, prompts, prompt_len, seed), gen) if gen else []
    return {"model": str(model), "positions": total, "top1_agreement": agree / total,
            "misses": total - agree, "median_exact_margin_on_misses": float(np.median(margins)) if margins else None,
            "logit_spread": float(np.std(exact)), "seconds": times, "greedy_tokens": gen,
            "greedy_first_difference": first_difference}


def _greedy_divergence(engine: Engine, prompts: list[list[int]], gen: int) -> list[int | None]:
    """Per prompt, the first of `gen` greedy tokens where the int8 head's choice differs from the bf16
    head's (None: all the same), both through the engine's own batched loop."""
    tokens = {}
    m = engine.model
    for head in ("bf16", "int8"):
        model = BitNetModel(m.weights, m.slots, m.max_context, head=head, kv_cache=m.kv_cache)
        run = Engine(model, engine.tokenizer, engine.threads)
        reqs = [Request(i, prompt_token_ids=p, params=SamplingParams(max_tokens=gen))
                for i, p in enumerate(prompts)]
        tokens[head] = {r.key: r.token_ids for r in run.generate(reqs)}
    return [_first_difference(tokens["bf16"][k], tokens["int8"][k]) for k in sorted(tokens["bf16"])]


def _first_difference(a, b) -> int | None:
    """The first index where token sequences a and b differ (one ending earlier counts), or None."""
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if i == len(a) == len(b) else i


def _smaps(path_suffix: str) -> dict:
    """This process's total RSS and PSS, and those of the mappings of files ending in `path_suffix` (bytes)."""
    out = {"rss": 0, "pss": 0, "file_rss": 0, "file_pss": 0}
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping header: address range, perms, ..., path
                current = line.rstrip().endswith(path_suffix)
                continue
            if first in ("Rss:", "Pss:"):
                kb = int(line.split()[1]) * 1024
                key = first[:-1].lower()
                out[key] += kb
                if current:
                    out["file_" + key] += kb
    return out


def _share_worker(model, weights_format, head, threads, barrier, results):
    from .native import WEIGHTS_FILE

    engine = Engine.load(model, threads=threads, slots=1, max_context=64, head=head, weights_format=weights_format)
    engine.generate([Request("m", prompt_token_ids=list(range(1, 33)), params=SamplingParams(max_tokens=4))])
    barrier.wait()  # every worker has loaded and run: measure while all are alive
    results.put(_smaps(WEIGHTS_FILE))
    barrier.wait()


def memory_sharing(model: str, workers: int = 2, head: str = DEFAULT_HEAD, weights_format: str | None = None,
                   threads: int = 1) -> dict:
    """Load the model in `workers` processes at once and measure each one's RSS and PSS: the mapped
    weight file should count about once in total (PSS), not once per process."""
    import multiprocessing

    from .native import WEIGHTS_FILE, ensure_native

    native_dir = ensure_native(model, weights_format)  # convert once before the workers start
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_share_worker, args=(model, weights_format, head, threads, barrier, results))
             for _ in range(workers)]
    for p in procs:
        p.start()
    per = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {"model": str(model), "workers": workers, "head": head,
            "weights_file_bytes": (native_dir / WEIGHTS_FILE).stat().st_size, "per_worker": per,
            "total_rss": sum(r["rss"] for r in per), "total_pss": sum(r["pss"] for r in per),
            "weights_rss": sum(r["file_rss"] for r in per), "weights_pss": sum(r["file_pss"] for r in per)}


def bench_kernels(shape: str, threads: int | None = None, batches=(1, 8, 32, 64), head: bool = True) -> dict:
    """`ternpool bench kernels`: every linear shape of a model shape (v_proj is k_proj's shape, left
    out) in both weight formats and, with `head`, the output head, timed at each batch size with this
    machine's read bandwidth measured in the same run (all threads, and one). Returns {shape, threads,
    isa, kernel_path, read_bandwidth, read_bandwidth_one_thread, bandwidth, bandwidth_one_thread, rows}
    (rows: `kernels.bench.bench_linears`; bandwidth: `kernels.bandwidth.read_bandwidth`)."""
    from ternpool.kernels import set_threads
    from ternpool.kernels.bandwidth import read_bandwidth
    from ternpool.kernels.bench import bench_linears, kernel_path

    from .modelgen import SHAPES
    from .shapes import linear_shapes

    threads = set_threads(threads)
    dims = SHAPES[shape]
    shapes = linear_shapes(dims)
    shapes.pop("v_proj", None)  # same shape as k_proj
    bw, bw1 = read_bandwidth(), read_bandwidth(threads=1)
    rows = bench_linears(shapes, batches=tuple(batches), vocab=dims.vocab_size if head else None)
    path = kernel_path()
    return {"shape": shape, "threads": threads, "isa": path["isa"], "kernel_path": path,
            "read_bandwidth": bw["bytes_per_s"], "read_bandwidth_one_thread": bw1["bytes_per_s"],
            "bandwidth": bw, "bandwidth_one_thread": bw1, "rows": rows}
