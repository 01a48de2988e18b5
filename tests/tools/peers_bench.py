"""ternpool against the peer engines side by side, in one run: the table and target ratios of issue 14.

Columns: prefill of a 128-token prompt (tokens/s), single-stream decode (tg64, tokens/s) and aggregate
decode at 32 and 64 streams (tokens/s over all streams, decode steps only). Rows: our configurations
(weights format x head; default 2-bit/int8, 2-bit/bf16, 1.6-bit/int8) and whichever peers are given:
  llama.cpp   llama-bench -p 128 -n 64 (pp128, tg64) and llama-batched-bench -npp 128 -npl 32,64 (S_TG),
              once per GGUF (TQ2_0, TQ1_0);
  vlut.cpp    the same two programs of its own build, once per GGUF (I2_V_4, I1_V_2, ...);
  litespark   its bench.sh (chunked prefill of 128 tokens and tg64; it has no batching).
Every measurement is a fresh process with the same thread count. Rounds alternate the engines (the
order reversed every other round, as tests/tools/isa_ab.py does) and the table keeps each cell's best
round: on a shared machine a slow round is noise, not the engine. A peer whose location is not given
is skipped with a message; one that fails is reported and left blank.

The peers run on a model of the same shape (2b4t) as ours: llama.cpp and vlut.cpp need their own
GGUFs (see the peers' README beside the project), litespark and ours read a Hugging Face directory
(`ternpool make-model --shape 2b4t`; ours also takes its cached `--shape` model). Speed does not
depend on the random weights' values.

Usage (every location may also come from the environment variable named in --help):
  python tests/tools/peers_bench.py --threads 2 --rounds 3 --model MODEL_DIR \\
      --llama-bin LLAMA_BUILD/bin --llama-gguf peer-2b4t-TQ2_0.gguf,peer-2b4t-TQ1_0.gguf \\
      --vlut-bin VLUT_BUILD/bin --vlut-gguf ggml-model-I2_V_4.gguf,ggml-model-I1_V_2.gguf \\
      --litespark-sh PEERS_SHARED/litespark/bench.sh --litespark-python LITESPARK_VENV/bin/python \\
      --json peers.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("peers_bench")

COLUMNS = ["prefill", "decode_1"]  # and decode_<n> for each --streams count (set in main)
HEADERS = {"prefill": "prefill (tok/s)", "decode_1": "decode 1 stream"}
# issue 14's targets: ours best / best peer in the column (aggregate decode: 2.0 at every stream count)
TARGETS = {"prefill": 2.0, "decode_1": 1.25}
OURS_DEFAULT = "2bit:int8,2bit:bf16,1.6bit:int8"


@dataclass
class Entry:
    """One row: an engine in one configuration, with the command-line runs that measure it."""
    engine: str  # ternpool | llama.cpp | vlut.cpp | litespark
    label: str
    runs: list  # of argv lists (or a callable per round for ours); each yields some COLUMNS
    env: dict = field(default_factory=dict)
    samples: dict = field(default_factory=lambda: {c: [] for c in COLUMNS})
    info: dict = field(default_factory=dict)

    def best(self, col: str):
        return max(self.samples[col]) if self.samples[col] else None


# ---- ours: one worker process per configuration and round ------------------------------------------

def ours_worker(a: argparse.Namespace) -> None:
    """Load the model as one configuration says, warm up, then time prefill, single-stream decode and
    aggregate decode at each stream count as `ternpool bench model` does (engine.bench's runner: decode
    rates count decode-only steps). Prints one JSON line."""
    from ternpool.engine import Engine
    from ternpool.engine.bench import random_prompts, timed_run, warm_up
    from ternpool.kernels.bench import kernel_path

    fmt, head = a.config.split(":")
    streams = [int(s) for s in a.streams.split(",")]
    gen = max(a.gen, a.batched_gen)
    engine = Engine.load(a.model, threads=a.threads, slots=max(streams + [1]),
                         max_context=max(a.prompt_len, a.batched_prompt_len) + gen + 1,
                         step_tokens=max(512, a.prompt_len), head=head, weights_format=fmt)
    engine.stop_ids = frozenset()  # random models may sample an end token: always generate the tokens asked
    warm_up(engine, a.prompt_len)
    out = {"prefill": a.prompt_len / timed_run(engine, random_prompts(engine, 1, a.prompt_len, 1), 1)["ttft_s"],
           "decode_1": timed_run(engine, random_prompts(engine, 1, a.prompt_len, 2), a.gen)["decode_tokens_per_s"]}
    for s in streams:
        prompts = random_prompts(engine, s, a.batched_prompt_len, 10 + s)
        out[f"decode_{s}"] = timed_run(engine, prompts, a.batched_gen)["decode_tokens_per_s"]
    out["kernel_path"] = kernel_path()
    out["weights_format"] = engine.model.weights.weights_format
    print(json.dumps(out), flush=True)


def ours_entries(a: argparse.Namespace) -> list[Entry]:
    from types import SimpleNamespace

    from ternpool.cluster.cli.bench import resolve_model

    model = resolve_model(SimpleNamespace(model=a.model, shape="2b4t"))
    out = []
    for config in a.ours.split(","):
        argv = [sys.executable, __file__, "--ours-worker", config, "--model", model, "--threads", str(a.threads),
                "--prompt-len", str(a.prompt_len), "--gen", str(a.gen), "--batched-gen", str(a.batched_gen),
                "--batched-prompt-len", str(a.batched_prompt_len), "--streams", a.streams]
        fmt, head = config.split(":")
        out.append(Entry("ternpool", f"ternpool {fmt}, {head} head", [argv]))
    return out


# ---- peers ------------------------------------------------------------------------------------------

def _gguf_label(path: str) -> str:
    stem = Path(path).stem
    return stem.split("-")[-1] if "-" in stem else stem  # peer-2b4t-TQ2_0 / ggml-model-I2_V_4 -> the type


def llama_like_entries(engine: str, bin_dir: str, ggufs: str, a: argparse.Namespace) -> list[Entry]:
    """llama.cpp and vlut.cpp: llama-bench (pp, tg) and llama-batched-bench (S_TG) of their build."""
    bench, batched = Path(bin_dir) / "llama-bench", Path(bin_dir) / "llama-batched-bench"
    for p in (bench, batched):
        if not p.exists():
            raise SystemExit(f"{engine}: {p} not found (give the build's bin directory)")
    out = []
    streams = [int(s) for s in a.streams.split(",")]
    ctx = max(streams) * (a.batched_prompt_len + a.batched_gen) + 256
    for g in ggufs.split(","):
        if not Path(g).exists():
            raise SystemExit(f"{engine}: GGUF {g} not found")
        runs = [[str(bench), "-m", g, "-t", str(a.threads), "-p", str(a.prompt_len), "-n", str(a.gen), "-r",
                 str(a.peer_reps), "-o", "json"],
                [str(batched), "-m", g, "-t", str(a.threads), "-tb", str(a.threads), "-c", str(ctx), "-npp",
                 str(a.batched_prompt_len), "-ntg", str(a.batched_gen), "-npl", a.streams, "--output-format", "jsonl"]]
        out.append(Entry(engine, f"{engine} {_gguf_label(g)}", runs))
    return out


def litespark_entries(a: argparse.Namespace) -> list[Entry]:
    model = a.litespark_model or a.model
    if not model:
        raise SystemExit("litespark: give --litespark-model (a Hugging Face BitNet directory) or --model")
    out = []
    for embed in a.litespark_embed.split(","):
        env = {"MODEL": model, "PY": a.litespark_python, "THREADS": str(a.threads), "EMBED": embed,
               "PP": str(a.prompt_len), "TG": str(a.gen), "AS_SHIPPED": "0"}
        out.append(Entry("litespark", f"litespark {embed} head", [["bash", a.litespark_sh]], env=env))
    return out


def parse(entry: Entry, argv: list, stdout: str, stderr: str, a: argparse.Namespace) -> dict:
    """The columns one run measured, from its output."""
    if entry.engine == "ternpool":
        r = json.loads(stdout.strip().splitlines()[-1])
        entry.info.update(kernel_path=r.pop("kernel_path"), weights_format=r.pop("weights_format"))
        return r
    if entry.engine == "litespark":
        r = json.loads(stdout.strip().splitlines()[-1])
        return {"prefill": r[f"pp{a.prompt_len}"], "decode_1": r["tg"]}
    if Path(argv[0]).name == "llama-bench":
        r = {}
        for t in json.loads(stdout):
            if t["n_prompt"] == a.prompt_len and t["n_gen"] == 0:
                r["prefill"] = t["avg_ts"]
            elif t["n_prompt"] == 0 and t["n_gen"] == a.gen:
                r["decode_1"] = t["avg_ts"]
        return r
    r = {}
    for line in (stdout + "\n" + stderr).splitlines():  # llama-batched-bench: one JSON line per -npl
        if line.startswith("{") and '"speed_tg"' in line:
            t = json.loads(line)
            r[f"decode_{t['pl']}"] = t["speed_tg"]
    return r


def run_entry(entry: Entry, a: argparse.Namespace) -> None:
    for argv in entry.runs:
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, check=False, capture_output=True, text=True, env={**os.environ, **entry.env},
                               timeout=a.timeout)
        except subprocess.TimeoutExpired:
            log.error("%s: %s did not finish in %s s: stopped, its cells stay blank", entry.label, argv[0], a.timeout)
            continue
        if p.returncode != 0:
            log.error("%s: %s exited with %d; its stderr ends:\n%s", entry.label, " ".join(map(str, argv[:2])),
                      p.returncode, p.stderr[-2000:])
            continue
        try:
            r = parse(entry, argv, p.stdout, p.stderr, a)
        except (ValueError, KeyError, IndexError) as e:
            log.error("%s: cannot read the output of %s (%s); it ends:\n%s", entry.label, argv[0], e, p.stdout[-2000:])
            continue
        for col, v in r.items():
            if col in entry.samples:
                entry.samples[col].append(v)
        log.info("%s: %s in %.0f s", entry.label, ", ".join(f"{c} {v:.1f}" for c, v in r.items() if c in COLUMNS),
                 time.perf_counter() - t0)


def header(col: str) -> str:
    return HEADERS.get(col) or f"aggregate {col.split('_')[1]} streams"


# ---- the table ----------------------------------------------------------------------------------------

def ratios(entries: list[Entry]) -> dict:
    """Per column: ours best / best peer, which rows those are, and the target."""
    out = {}
    for col in COLUMNS:
        ours = [(e.best(col), e.label) for e in entries if e.engine == "ternpool" and e.best(col) is not None]
        peers = [(e.best(col), e.label) for e in entries if e.engine != "ternpool" and e.best(col) is not None]
        if ours and peers:
            (o, ol), (p, pl) = max(ours), max(peers)
            out[col] = {"ours": o, "ours_row": ol, "peer": p, "peer_row": pl, "ratio": o / p,
                        "target": TARGETS.get(col, 2.0), "met": o / p >= TARGETS.get(col, 2.0)}
    return out


def print_table(entries: list[Entry], rs: dict, a: argparse.Namespace) -> None:
    width = max(len(e.label) for e in entries) + 2
    print(f"\n{a.threads} threads; best of {a.rounds} alternating rounds; prompt {a.prompt_len} tokens, single-stream "
          f"decode {a.gen} tokens; batched: prompts of {a.batched_prompt_len} tokens, then {a.batched_gen} decoded per stream")
    print(f"{'engine':<{width}}" + "".join(f"{header(c):>22}" for c in COLUMNS))
    for e in entries:
        print(f"{e.label:<{width}}" + "".join(f"{e.best(c):22.1f}" if e.best(c) is not None else f"{'-':>22}"
                                              for c in COLUMNS))
    print("\nours best / best peer (target):" if rs else "\n(no column has both ours and a peer: no ratios)")
    for col, r in rs.items():
        print(f"  {header(col):<22} {r['ratio']:5.2f}x  ({r['ours_row']} {r['ours']:.1f} / {r['peer_row']} "
              f"{r['peer']:.1f}; target >= {r['target']}x: {'met' if r['met'] else 'missed'})")
    from ternpool.kernels.bench import describe_kernel_path
    paths = {e.label: e.info["kernel_path"] for e in entries if "kernel_path" in e.info}
    if paths:
        print("ours: " + describe_kernel_path(next(iter(paths.values()))))


def main() -> int:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for every engine (default: 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each cell keeps its best (default: 3)")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    ap.add_argument("--gen", type=int, default=64, help="single-stream decode tokens (default: 64, tg64)")
    ap.add_argument("--batched-gen", type=int, default=64, help="decode tokens per stream when batched (default: 64)")
    ap.add_argument("--batched-prompt-len", type=int,
                    help="prompt tokens of each stream before batched decode (default: --prompt-len)")
    ap.add_argument("--streams", default="32,64", help="stream counts for aggregate decode (default: 32,64)")
    ap.add_argument("--model", default=env("TERNPOOL_PEERS_MODEL"),
                    help="our model: a Hugging Face or native directory of the 2b4t shape (env TERNPOOL_PEERS_MODEL; "
                    "default: ternpool's cached random --shape 2b4t model)")
    ap.add_argument("--ours", default=OURS_DEFAULT,
                    help=f"our configurations, weights_format:head, comma-separated; empty skips ours "
                    f"(default: {OURS_DEFAULT})")
    ap.add_argument("--llama-bin", default=env("LLAMA_CPP_BIN"), help="llama.cpp build's bin directory (env LLAMA_CPP_BIN)")
    ap.add_argument("--llama-gguf", default=env("LLAMA_CPP_GGUF"), help="its GGUFs, comma-separated (env LLAMA_CPP_GGUF)")
    ap.add_argument("--vlut-bin", default=env("VLUT_CPP_BIN"), help="vlut.cpp build's bin directory (env VLUT_CPP_BIN)")
    ap.add_argument("--vlut-gguf", default=env("VLUT_CPP_GGUF"), help="its GGUFs, comma-separated (env VLUT_CPP_GGUF)")
    ap.add_argument("--litespark-sh", default=env("LITESPARK_BENCH"),
                    help="the peers' litespark/bench.sh (env LITESPARK_BENCH)")
    ap.add_argument("--litespark-python", default=env("LITESPARK_PYTHON", "python"),
                    help="python of the venv with litespark-inference (env LITESPARK_PYTHON)")
    ap.add_argument("--litespark-model", default=env("LITESPARK_MODEL"),
                    help="Hugging Face BitNet directory for litespark (env LITESPARK_MODEL; default: --model)")
    ap.add_argument("--litespark-embed", default="int4",
                    help="litespark heads, comma-separated: int4 (its default), int8, bf16 (default: int4)")
    ap.add_argument("--peer-reps", type=int, default=1, help="llama-bench -r per round (default: 1)")
    ap.add_argument("--timeout", type=float, help="seconds any one command may run (default: no limit)")
    ap.add_argument("--json", help="also write the table, every round's numbers and the commands to this file")
    ap.add_argument("--ours-worker", dest="config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.batched_prompt_len = a.batched_prompt_len or a.prompt_len
    COLUMNS[2:] = [f"decode_{s}" for s in a.streams.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.config:
        ours_worker(a)
        return 0

    entries = ours_entries(a) if a.ours else []
    for engine, flag, bin_dir, ggufs in (("llama.cpp", "llama", a.llama_bin, a.llama_gguf),
                                         ("vlut.cpp", "vlut", a.vlut_bin, a.vlut_gguf)):
        if bin_dir and ggufs:
            entries += llama_like_entries(engine, bin_dir, ggufs, a)
        else:
            log.warning("%s skipped: give --%s-bin and --%s-gguf", engine, flag, flag)
    if a.litespark_sh:
        entries += litespark_entries(a)
    else:
        log.warning("litespark skipped: give --litespark-sh (and --litespark-python)")
    if not entries:
        raise SystemExit("nothing to run")
    for r in range(a.rounds):
        for e in (entries if r % 2 == 0 else entries[::-1]):
            log.info("round %d/%d: %s", r + 1, a.rounds, e.label)
            run_entry(e, a)
    rs = ratios(entries)
    print_table(entries, rs, a)
    if a.json:
        Path(a.json).write_text(json.dumps({
            "threads": a.threads, "rounds": a.rounds, "prompt_len": a.prompt_len, "gen": a.gen,
            "batched_gen": a.batched_gen, "batched_prompt_len": a.batched_prompt_len, "streams": a.streams,
            "rows": [{"engine": e.engine, "label": e.label, "best": {c: e.best(c) for c in COLUMNS},
                      "samples": e.samples, "commands": [[str(x) for x in r] for r in e.runs], "env": e.env, **e.info}
                     for e in entries],
            "ratios": rs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
