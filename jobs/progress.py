"""Job state shared with other shells through the output directory: `_progress.json` (kept
current by the driver), `_cancel` (written by `ternpool cancel`, polled by the driver) and
`status`, which combines them with the manifest. No Ray needed."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from . import storage
from .errors import JobInputError
from .manifest import Manifest
from .runlock import local_holder, uri_holder, when
from .storage import CANCEL_FILE, OWNER_FILE, PROGRESS_FILE  # noqa: F401 (importers use them from here)

log = logging.getLogger(__name__)


def write_progress(output: str, data: dict) -> None:
    """Replace `OUT/_progress.json` atomically with `data` (JSON-able). Adds `updated` (the
    current time) unless `data` has one. Keys `status` reads: state ("running", "cancelled",
    "finished", ...), updated, tokens_per_s."""
    payload = {"updated": time.time(), **data}
    fs, base = storage.resolve(output)
    storage.write_bytes_atomic(fs, storage.join(base, PROGRESS_FILE),
                               json.dumps(payload, sort_keys=True).encode("utf-8"))


def read_progress(output: str) -> dict | None:
    """The last progress written to `output`, or None when there is none (or it is unreadable,
    which is logged: progress is advisory, the manifest is the record)."""
    fs, base = storage.resolve(output)
    path = storage.join(base, PROGRESS_FILE)
    try:
        raw = storage.read_bytes(fs, path)
        if raw is None:
            return None
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable progress file %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("ignoring progress file %s: expected a JSON object, found %s", path,
                    type(data).__name__)
        return None
    return data


def request_cancel(output: str) -> None:
    """Ask the job writing to `output` to stop: creates `OUT/_cancel`, which the driver polls.
    JobInputError when `output` holds no ternpool job (ternpool writes only into outputs it owns)."""
    fs, base = storage.resolve(output)
    if not storage.exists(fs, storage.join(base, storage.MANIFEST_FILE)):
        raise JobInputError(f"no job manifest in {output}: it holds no ternpool job, nothing to cancel")
    storage.write_bytes_atomic(fs, storage.join(base, CANCEL_FILE),
                               json.dumps({"requested": time.time()}).encode("utf-8"))
    log.info("cancel requested for %s", output)


def cancel_requested(output: str) -> bool:
    fs, base = storage.resolve(output)
    return storage.exists(fs, storage.join(base, CANCEL_FILE))


def clear_cancel(output: str) -> None:
    fs, base = storage.resolve(output)
    path = storage.join(base, CANCEL_FILE)
    if storage.exists(fs, path):
        fs.delete_file(path)


def claim_output(output: str) -> str:
    """Make a new run the only writer of `output`; returns its run id. A run that finds another
    id in OUT/_owner (it was superseded, e.g. its driver died and the job was rerun) must stop."""
    import os
    import socket
    import uuid

    run_id = uuid.uuid4().hex
    fs, base = storage.resolve(output)
    record = {"run_id": run_id, "claimed": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
    storage.write_bytes_atomic(fs, storage.join(base, OWNER_FILE), json.dumps(record).encode("utf-8"))
    return run_id


def read_owner(output: str) -> dict | None:
    """OUT/_owner of the last run that claimed `output` (run_id, claimed, pid, host), or None;
    `since` is set to its claim time."""
    fs, base = storage.resolve(output)
    try:
        raw = storage.read_bytes(fs, storage.join(base, OWNER_FILE))
        data = None if raw is None else json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable owner file in %s: %s", output, exc)
        return None
    return {**data, "since": data.get("claimed")} if isinstance(data, dict) else None


def owns_output(output: str, run_id: str) -> bool:
    fs, base = storage.resolve(output)
    raw = storage.read_bytes(fs, storage.join(base, OWNER_FILE))
    if raw is None:
        return False
    try:
        return json.loads(raw.decode("utf-8")).get("run_id") == run_id
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def status(output: str) -> dict[str, Any]:
    """The state of the job in `output` from its manifest and progress file:
    job_id, state ("running" | "finished" | "cancelled" | "failed" | "incomplete"), rows_total,
    rows_done, shards_total, shards_done, failed_rows, job_prompt_tokens, job_generated_tokens and
    job_cached_tokens (of the written shards), tokens_per_s (None without progress), cost
    (core-seconds and dollars per million tokens, see cluster/cost.py; None before any),
    updated (time of the last progress update, else of the manifest's finish or creation),
    eta_s (seconds to go while running, None until known; 0 when finished), error (why the job
    failed, or that its driver is gone; else None) and driver (the live driver's pid, host and
    since, else None).

    "running" needs a live driver: for a local OUT one holding OUT/_lock, for a URI a progress
    update within RUNNING_STALE_AFTER seconds. A job whose progress says running without one is
    "incomplete" (rerun the command to resume), with error saying the driver is gone.
    JobInputError when `output` has no manifest."""
    manifest = Manifest.load(output)
    progress = read_progress(output) or {}
    done = manifest.done_shards()
    entries = [manifest.completed[s] for s in done]
    updated = progress.get("updated")
    if updated is None:
        updated = manifest.finished if manifest.finished is not None else manifest.created
    progress_state = progress.get("state")
    driver = local_holder(output) if not storage.is_uri(output) else uri_holder(output)
    error = None
    if len(done) == manifest.num_shards:
        state = "finished"
    elif progress_state == "cancelled":
        state = "cancelled"
    elif progress_state == "failed":
        state = "failed"
        error = progress.get("error") or "the job failed (no error was recorded)"
    elif progress_state == "running" and driver is not None:
        state = "running"
    else:
        state = "incomplete"
        if progress_state == "running":
            error = (f"the driver is gone (last update {when(updated)}); rerun the same command to "
                     "resume")
    return {
        "job_id": manifest.job_id,
        "state": state,
        "rows_total": manifest.num_rows,
        "rows_done": sum(int(e.get("rows", 0)) for e in entries),
        "shards_total": manifest.num_shards,
        "shards_done": len(done),
        "failed_rows": sum(int(e.get("failed_rows", 0)) for e in entries),
        # tokens of the written shards' rows without an error; cached: prompt tokens the prefix cache held
        **{f"job_{k}_tokens": sum(int(e.get(f"{k}_tokens", 0)) for e in entries)
           for k in ("prompt", "generated", "cached")},
        "tokens_per_s": progress.get("tokens_per_s"),
        # this run's cost figures (cluster.cost.JobCost.to_dict()), else the last finished run's, else None
        "cost": progress.get("cost") or manifest.cost,
        "updated": updated,
        "error": error,
        "driver": driver,
        # remaining rows / the recent row rate while running (None until known), 0 when finished
        "eta_s": 0.0 if state == "finished" else progress.get("eta_s") if state == "running" else None,
    }
