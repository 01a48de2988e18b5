"""`ternpool submit | status | cancel | export | demo`: batch jobs on a Ray worker pool, reading their state and
writing their output again."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from ternpool.cluster.stats import cache_share
from ternpool.engine.options import TRUNCATE_MODES
from ternpool.jobs.formats import FORMATS
from ternpool.jobs.spec import OUTPUT_FORMATS

from .options import add_engine_options, add_sampling_options, engine_config, sampling_params

log = logging.getLogger("ternpool")


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, help="output directory (part files + _manifest.json)")
    p.add_argument("--address", help="Ray cluster to join ('auto' for the one this node belongs to); "
                   "default: start an embedded local cluster")
    p.add_argument("--object-store-mb", type=int,
                   help="object store of the embedded cluster, MB (default: 512; it carries prompts and results "
                   "only, the model is mapped from disk); a cluster joined with --address keeps its own")
    p.add_argument("--workers", type=int, help="number of worker actors (default: one per node)")
    add_engine_options(p, pool=True)
    add_sampling_options(p, job=True)
    p.add_argument("--input-format", choices=tuple(FORMATS),
                   help="read the inputs as this format (default: by suffix; a .jsonl file whose first line has "
                   "'custom_id' or 'body' is an OpenAI Batch file, any other a JSON Lines file of columns)")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, default="parquet",
                   help="openai: also write OUT/output.jsonl and OUT/errors.jsonl (OpenAI Batch output and error "
                   "lines) when the job finishes; the default for OpenAI Batch inputs (default: parquet parts only)")
    p.add_argument("--shard-rows", type=int, default=64, help="rows per shard at most (default: 64)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose worker is lost (default: 3)")
    p.add_argument("--truncate", choices=TRUNCATE_MODES, default="error",
                   help="a prompt longer than the context: an error row (default), or keep its end")
    p.add_argument("--hang-timeout", type=float, default=300.0,
                   help="seconds without progress before a worker is declared hung (default: 300)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port while the job runs (default: 9469, or a free port "
                   "when that is taken, e.g. by another job; 0: a free port; -1: none); a given port that is taken "
                   "is an error")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the metrics endpoint binds to (default: 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--pushgateway", help="also push the final metrics to this Prometheus Pushgateway URL")
    p.add_argument("--node-price", type=_price, metavar="DOLLARS_PER_NODE_HOUR",
                   help="what a node costs an hour: adds dollars (nodes x processing time x price) and dollars per "
                   "million tokens to the cost figures of the summary, status, _manifest.json and metrics")
    p.add_argument("--dry-run", action="store_true",
                   help="validate input and model, print the plan and an estimate of the job's hours (and dollars "
                   "with --node-price) measured with a short calibration of the model on this node; do not run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _price(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected dollars per node-hour, a number >= 0, got {text!r}")
    return value


def _job_kwargs(args) -> dict:
    return dict(sampling=sampling_params(args), shard_rows=args.shard_rows, max_retries=args.max_retries,
                truncate=args.truncate, input_format=args.input_format, output_format=args.output_format)


def _pool(args):
    from ternpool.cluster.driver import PoolConfig

    return PoolConfig(address=args.address, workers=args.workers, engine=engine_config(args),
                      hang_timeout=args.hang_timeout,
                      metrics_host=args.metrics_host, metrics_port=args.metrics_port,
                      pushgateway=args.pushgateway, node_price=args.node_price,
                      object_store_memory=None if args.object_store_mb is None else args.object_store_mb << 20)


def _print_plan(plan, pool, sizing) -> None:
    """The dry run's report: inputs, shards, model, and for every node whether one worker fits it
    (`sizing` from `sizing.size_job`, the check `submit` refuses a job with; nothing is computed here)."""
    from ternpool.engine.footprint import kv_pool_text
    from ternpool.engine.shapes import kv_bytes_per_slot

    cfg = plan.config
    todo = plan.todo
    print(f"input:   {plan.inputs.uri}: {len(plan.inputs.files)} file(s), {plan.inputs.num_rows} rows, "
          f"text column '{plan.inputs.text_column}', passthrough {list(plan.inputs.passthrough)}")
    print(f"shards:  {len(plan.shards)} of <= {plan.spec.shard_rows} rows; {len(todo)} to run "
          f"({sum(s.num_rows for s in todo)} rows), {len(plan.shards) - len(todo)} already done")
    print(f"model:   {plan.model_dir} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.quantization_mode}); {sizing.weights_format} weights, {sizing.head} head, "
          f"{sizing.kv_cache} KV cache, context {sizing.max_context} tokens")
    print(f"workers: {pool.workers or 'one per node'}, "
          + (f"{sizing.slots} slots each" if sizing.slots else "slots chosen per node"))
    if not sizing.nodes:
        print("nodes:   none with a CPU and memory in this Ray cluster")
    for n in sizing.nodes:
        fp = n.footprint
        print(f"node {n.node_id[:12]} ({n.address}): {n.verdict()}" + (
            f" (weights {fp.weights / 1e9:.2f} GB, KV cache {fp.kv_cache / 1e9:.2f} GB for {n.slots} slots, "
            f"runtime {fp.runtime / 1e9:.2f} GB)" if n.fits else ""))
    slots = sizing.slots or min((n.slots for n in sizing.nodes if n.fits), default=0)
    if slots:
        print("memory:  " + kv_pool_text(slots, sizing.max_context, kv_bytes_per_slot(cfg, sizing.max_context,
                                                                                    sizing.kv_cache), sizing.kv_cache)
              + ("" if pool.engine.prefix_cache else " (off: --no-prefix-cache)"))
    print(f"output:  {plan.spec.output}")


def _run(handle, show_progress: bool):
    """Wait for the job with a progress bar; Ctrl-C cancels it (completed shards are kept)."""
    from tqdm import tqdm

    from ternpool.cluster.driver import ProgressUnavailable, StillRunning

    total = handle.plan.manifest.num_rows
    bar = tqdm(total=total, unit="row", disable=not show_progress, dynamic_ncols=True, file=sys.stderr)
    # Ctrl-C sets a flag instead of raising: a KeyboardInterrupt raised inside a Ray call can come out
    # as another exception (and be missed); a second Ctrl-C stops waiting for the cancel
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        while not interrupted.is_set():
            try:
                return handle.wait(timeout=0.5)
            except StillRunning:  # show its progress, wait again
                pass
            try:
                s = handle.progress()
            except ProgressUnavailable as e:  # e.g. the job winds down: wait() returns its summary
                log.debug("no progress to show: %s", e)
                continue
            bar.n = s.rows_done
            bar.set_postfix(tok_s=f"{s.tokens_per_s:.1f}", workers=s.active_workers, failed=s.failed_rows,
                            refresh=False)
            bar.refresh()
        bar.write("interrupted: cancelling (completed shards are kept; rerun the same command to resume)")
        handle.cancel()
        return handle.wait()
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def print_summary(summary) -> None:
    s = summary
    this_run = f" ({s.rows_this_run} in this run)" if s.resumed else ""
    run_tokens = (f" ({s.prompt_tokens_this_run} + {s.generated_tokens_this_run} in this run)" if s.resumed else "")
    print(f"job {s.job_id}: {s.state}; {s.rows} rows{this_run}, {s.failed_rows} failed; {s.prompt_tokens} prompt + "
          f"{s.generated_tokens} generated tokens{run_tokens}; {s.tokens_per_s:.1f} tokens/s over "
          f"{s.processing_s:.1f} s of processing ({s.wall_s:.1f} s in all); {s.retries} retries, "
          f"{s.worker_restarts} worker losses")
    print(cache_share(s.cached_tokens, s.prompt_tokens))
    for wid, w in sorted(s.per_worker.items()):
        rate = w.generated_tokens / s.processing_s if s.processing_s else 0.0
        lost = " (lost)" if w.lost else ""
        print(f"  {wid}{lost}: {w.rows} rows, {w.generated_tokens} tokens, {rate:.1f} tokens/s; "
              f"{cache_share(w.cached_tokens, w.prompt_tokens)}")
    if s.cost is not None:
        print(s.cost.line())
    print(f"output: {s.output} (read with ternpool.jobs.read_output)")



def cmd_submit(args) -> int:
    from ternpool.cluster.driver import JobHandle, prepare
    from ternpool.cluster.sizing import size_on_cluster
    from ternpool.jobs import JobSpec
    from ternpool.jobs.openai_output import openai_paths, wants_openai, write_openai_files

    spec = JobSpec(inputs=args.input, output=args.output, model=args.model, **_job_kwargs(args))
    plan = prepare(spec)
    pool = _pool(args)
    if args.dry_run:  # the same sizing as submit, against the nodes of the cluster submit would use
        sizing = size_on_cluster(plan, pool)
        _print_plan(plan, pool, sizing)
        if sizing.fits and plan.todo:
            from ternpool.cluster.calibrate import estimate

            fitting = [n for n in sizing.nodes if n.fits]
            nodes = min(pool.workers or len(fitting), len(fitting))
            print(estimate(plan, pool, sizing.slots or min(n.slots for n in fitting), nodes).line())
        return 0 if sizing.fits else 2
    if not plan.todo:
        print(f"nothing to do: all {len(plan.shards)} shards of {args.output} are complete")
        if wants_openai(plan.spec, plan.inputs):
            for path in write_openai_files(args.output):
                print(f"openai: {path}")
        return 0
    handle = JobHandle(plan, pool)
    print(f"job {handle.job_id}: {len(plan.todo)} shards to run; metrics: {handle.metrics_url or 'off'}", flush=True)
    summary = _run(handle, show_progress=not args.no_progress and sys.stderr.isatty())
    print_summary(summary)
    if summary.state == "finished" and wants_openai(plan.spec, plan.inputs):
        print(f"openai: {openai_paths(args.output)[0]} and {openai_paths(args.output)[1]}")
    if summary.error:
        print(f"error: {summary.error}", file=sys.stderr)
        return 1
    return 0 if summary.state == "finished" else 130


def format_eta(seconds: float) -> str:
    """3 s, 4m05s, 2h03m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def cmd_status(args) -> int:
    from ternpool.jobs import status

    s = status(args.output)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"job {s.get('job_id')}: {s['state']}; {s['rows_done']}/{s['rows_total']} rows, "
          f"{s['shards_done']}/{s['shards_total']} shards, {s.get('failed_rows', 0)} failed rows"
          + (f", {s['tokens_per_s']:.1f} tokens/s" if s.get("tokens_per_s") else "")
          + (f", ETA {format_eta(s['eta_s'])}" if s.get("eta_s") is not None and s["state"] == "running" else ""))
    if s.get("job_prompt_tokens"):
        print(cache_share(s.get("job_cached_tokens", 0), s["job_prompt_tokens"]))
    if s.get("cost"):
        from ternpool.cluster.cost import JobCost

        c = s["cost"]
        print(JobCost(c["core_s"], c["node_s"], c["prompt_tokens"], c["generated_tokens"], c.get("node_price")).line())
    if s.get("driver"):
        d = s["driver"]
        print(f"driver: pid {d.get('pid', '?')} on host {d.get('host', '?')}")
    if s.get("error"):
        print(f"error: {s['error']}")
    return 0


def cmd_cancel(args) -> int:
    from ternpool.jobs import request_cancel  # not through the driver, which imports Ray

    request_cancel(args.output)
    print(f"cancel requested: the job writing {args.output} stops at its next check (within a second)")
    return 0


def cmd_demo(args) -> int:
    from ternpool.cluster.demo import prepare_demo
    from ternpool.cluster.driver import JobHandle, PoolConfig
    from ternpool.engine.options import EngineConfig
    from ternpool.jobs import read_output

    plan = prepare_demo(args.dir, rows=args.rows, note=print)
    output = plan.spec.output
    if plan.todo:
        summary = _run(JobHandle(plan, PoolConfig(engine=EngineConfig(slots=8))), show_progress=sys.stderr.isatty())
        print_summary(summary)
        if summary.state != "finished":
            return 1
    else:
        print(f"the job in {output} is already complete")
    table = read_output(str(output))
    print(f"first rows of {output}:")
    for row in table.slice(0, 5).to_pylist():
        text = (row["generated_text"] or "").replace("\n", " ")
        print(f"  row {row['row_index']} id={row.get('id')!r} {row['finish_reason']:<6} "
              f"{row['completion_tokens']:>3} tokens  {text[:40]!r}" + (f" error: {row['error']}" if row["error"] else ""))
    return 0


def cmd_export(args) -> int:
    from ternpool.jobs.export import export

    for path, count in export(args.output, args.format, args.to, force=args.force):
        print(f"wrote {path} ({count} {'lines' if args.format != 'parquet' else 'rows'})")
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("submit", help="run a batch job over Parquet, JSON Lines or OpenAI Batch prompts on a Ray "
                       "worker pool",
                       description="Generate for every row of INPUT (Parquet or JSON Lines with a 'prompt' or "
                       "'messages' column, or OpenAI Batch input files; a file, directory, glob or URI) and write "
                       "OUT/part-*.parquet + OUT/_manifest.json, one output row per input row (for OpenAI Batch "
                       "inputs also OUT/output.jsonl and OUT/errors.jsonl). Rerunning the same command resumes.")
    s.add_argument("input", help="Parquet, JSON Lines or OpenAI Batch file, directory, glob or URI")
    s.add_argument("--model", "-m", required=True, help="model directory (on every node) or Hub id")
    add_job_options(s)
    s.set_defaults(func=cmd_submit)

    st = sub.add_parser(
        "status", help="progress of a running or finished job (reads OUT)",
        description="Print the state of the job writing OUT, read from OUT/_manifest.json (the shards and rows "
        "completed) and OUT/_progress.json (kept current by the submitting process: tokens/s, ETA). Works from "
        "any shell that can read OUT, with no Ray address and without loading the model. States: running (a live "
        "submitting process holds OUT; for a URI output, it updated the progress in the last minute), finished "
        "(every shard is written), cancelled (stopped by Ctrl-C or `ternpool cancel`), failed (stopped by an "
        "error, shown with it, e.g. a disk that stayed full), incomplete (its process is gone, e.g. killed). "
        "Rerun the same submit command to resume a cancelled, failed or incomplete job.")
    st.add_argument("output", help="the job's output directory")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser(
        "cancel", help="stop a running job, keeping its completed shards",
        description="Write OUT/_cancel, which the submitting process polls every half second: the job stops "
        "handing out shards, keeps every shard already written and ends in the state cancelled (see `ternpool "
        "status`). Works from any shell that can write OUT, with no Ray address. Rerun the same submit command "
        "to resume.")
    c.add_argument("output", help="the job's output directory")
    c.set_defaults(func=cmd_cancel)

    e = sub.add_parser(
        "export", help="write a finished job's output again as one file (OpenAI Batch lines, JSON Lines, Parquet)",
        description="Read the Parquet parts of the finished job in OUT (in input order) and write them to FILE: "
        "--format openai writes OpenAI Batch output lines to FILE and error lines to FILE with '.errors' before its "
        "suffix (results.jsonl -> results.errors.jsonl), exactly one line per request across both; jsonl writes one "
        "JSON object per output row; parquet one Parquet file. Written atomically (temporary name, then rename). "
        "An existing FILE is refused unless --force; a FILE inside OUT or inside the job's inputs always is.")
    e.add_argument("output", help="the job's output directory")
    e.add_argument("--format", choices=("openai", "jsonl", "parquet"), required=True, help="what to write")
    e.add_argument("--to", required=True, metavar="FILE", help="the file to write (local path or URI)")
    e.add_argument("--force", action="store_true", help="replace FILE (and its .errors file) if it exists")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="make a tiny model and example prompts, run a job on the embedded cluster",
                       description="Everything in DIR: a tiny random model, an example prompts Parquet, and the "
                       "job's output. Rerunning reuses them (and resumes the job).")
    d.add_argument("--dir", default="ternpool-demo", help="working directory (default: ./ternpool-demo)")
    d.add_argument("--rows", type=int, default=200, help="example prompts to write (default: 200)")
    d.set_defaults(func=cmd_demo)
