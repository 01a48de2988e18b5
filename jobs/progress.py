"""Job state shared with other shells through the output directory: `_progress.json` (kept
current by the driver), `_cancel` (written by `ternpool cancel`, polled by the driver) and
`status`, which combines them with the manifest. No Ray needed."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from . import storage
from .manifest import Manifest

log = logging.getLogger(__name__)

PROGRESS_FILE = "_progress.json"
CANCEL_FILE = "_cancel"
OWNER_FILE = "_owner"  # the run that may write this output now (fencing against a stale run)
RUNNING_STALE_AFTER = 60.0  # seconds without a progress update before "running" is doubted


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
    """Ask the job writing to `output` to stop: creates `OUT/_cancel`, which the driver polls."""
    fs, base = storage.resolve(output)
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
    import uuid

    run_id = uuid.uuid4().hex
    fs, base = storage.resolve(output)
    storage.write_bytes_atomic(fs, storage.join(base, OWNER_FILE),
                               json.dumps({"run_id": run_id, "claimed": time.time()}).encode("utf-8"))
    return run_id


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
    job_id, state ("running" | "finished" | "cancelled" | "incomplete"), rows_total, rows_done,
    shards_total, shards_done, failed_rows, tokens_per_s (None without progress), updated
    (time of the last progress update, else of the manifest's finish or creation) and eta_s.
    JobInputError when `output` has no manifest."""
    manifest = Manifest.load(output)
    progress = read_progress(output) or {}
    done = manifest.done_shards()
    entries = [manifest.completed[s] for s in done]
    updated = progress.get("updated")
    if updated is None:
        updated = manifest.finished if manifest.finished is not None else manifest.created
    progress_state = progress.get("state")
    if len(done) == manifest.num_shards:
        state = "finished"
    elif progress_state == "cancelled":
        state = "cancelled"
    elif progress_state == "running" and isinstance(updated, (int, float)) \
            and time.time() - updated <= RUNNING_STALE_AFTER:
        state = "running"
    else:
        state = "incomplete"
    return {
        "job_id": manifest.job_id,
        "state": state,
        "rows_total": manifest.num_rows,
        "rows_done": sum(int(e.get("rows", 0)) for e in entries),
        "shards_total": manifest.num_shards,
        "shards_done": len(done),
        "failed_rows": sum(int(e.get("failed_rows", 0)) for e in entries),
        "tokens_per_s": progress.get("tokens_per_s"),
        "updated": updated,
        # remaining rows / the recent row rate while running (None until known), 0 when finished
        "eta_s": 0.0 if state == "finished" else progress.get("eta_s") if state == "running" else None,
    }
