"""One run per output directory: the live driver holds an exclusive lock on OUT for the job's
whole life, taken before anything is written and before Ray starts, so a second `ternpool submit`
of the same job on the same OUT stops at once instead of writing over the first.

Local outputs: `fcntl.flock` on `OUT/_lock`, which records the holder (pid, host, since). The OS
releases it when the driver exits or is killed, so a rerun after a crash resumes, and `status`
can tell a live driver from a dead one. URI outputs have no locks: a run is refused only while a
`running` progress fresher than RUNNING_STALE_AFTER seconds exists (two runs started within the
same second can both pass; the `_owner` fencing still stops the older one writing parts)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone

from . import storage
from .errors import JobInputError

log = logging.getLogger(__name__)

RUNNING_STALE_AFTER = 60.0  # seconds without a progress update before "running" is doubted
_TRIES = 20  # a `status` probing the lock holds it for microseconds: try again a few times first
_TRY_PAUSE_S = 0.05


class OutputBusyError(JobInputError):
    """OUT is being written by another live ternpool run."""


def when(seconds: float | None) -> str:
    """A time for messages: ISO 8601 in UTC."""
    if not isinstance(seconds, (int, float)):
        return "an unknown time"
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def busy_message(output: str, holder: dict) -> str:
    return (f"{output} is being written by another ternpool run, pid {holder.get('pid', '?')} on host "
            f"{holder.get('host', '?')} since {when(holder.get('since'))}; wait for it or cancel it "
            f"with `ternpool cancel {output}`")


class OutputLock:
    """`acquire()` before the first write to OUT, `release()` when the job has ended."""

    def __init__(self, output: str):
        self.output = storage.normalize(output)
        self.local = not storage.is_uri(self.output)
        self.path = os.path.join(self.output, storage.LOCK_FILE) if self.local else None
        self._fd: int | None = None
        self._made: list[str] = []  # what acquire created (directories, then the lock file)
        self._previous: tuple[bytes, os.stat_result] | None = None  # a lock file's content before ours

    def acquire(self) -> None:
        """Take OUT for this run; OutputBusyError naming the holder when another live run has it."""
        if not self.local:
            holder = uri_holder(self.output)
            if holder is not None:
                raise OutputBusyError(busy_message(self.output, holder))
            return
        self._make_dirs(self.output)
        for attempt in range(_TRIES):
            fd, created = _open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if attempt == _TRIES - 1:
                    raise OutputBusyError(busy_message(self.output, read_holder(self.path) or {})) from None
                time.sleep(_TRY_PAUSE_S)
                continue
            if not _same_file(fd, self.path):  # removed by a refused run between our open and lock
                os.close(fd)
                continue
            if created:
                self._made.append(self.path)
            else:
                self._previous = (_read_all(fd), os.fstat(fd))
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.time()}).encode("utf-8"))
            self._fd = fd
            return
        raise OutputBusyError(busy_message(self.output, read_holder(self.path) or {}))

    def release(self, undo: bool = False) -> None:
        """Let OUT go. `undo=True` (the job was refused before writing anything) also removes what
        `acquire` created, the lock file and directories, so OUT is left exactly as it was."""
        if self._fd is None:
            return
        try:
            if undo and self._previous is not None:  # the last run's record, as it was
                data, st = self._previous
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, data, 0)
                os.utime(self._fd, ns=(st.st_atime_ns, st.st_mtime_ns))
            if undo:
                for path in reversed(self._made):
                    try:
                        (os.unlink if path == self.path else os.rmdir)(path)
                    except OSError as exc:  # e.g. something appeared in a directory we made
                        log.warning("could not remove %s: %s", path, exc)
                        break
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None
            self._made = []
            self._previous = None

    def _make_dirs(self, directory: str) -> None:
        missing = []
        while directory and not os.path.isdir(directory):
            missing.append(directory)
            parent = os.path.dirname(directory)
            if parent == directory:
                break
            directory = parent
        for path in reversed(missing):
            try:
                os.mkdir(path)
                self._made.append(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise JobInputError(f"cannot create output directory {path}: {exc}") from None


def _open_lock(path: str) -> tuple[int, bool]:
    """(fd, created): the lock file opened for writing, made now or already there."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return os.open(path, os.O_RDWR), False


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, 1 << 16, sum(len(c) for c in chunks)):
        chunks.append(chunk)
    return b"".join(chunks)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def read_holder(path: str) -> dict | None:
    """The run recorded in a lock file (pid, host, since), or None."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read() or b"null")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable lock file %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def local_holder(output: str) -> dict | None:
    """For a local OUT: the live run holding its lock (pid, host, since), or None when no live
    driver holds it. Writes nothing (a shared lock taken and dropped at once)."""
    path = os.path.join(storage.normalize(output), storage.LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return read_holder(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def uri_holder(output: str) -> dict | None:
    """For a URI OUT: the run whose `running` progress is fresher than RUNNING_STALE_AFTER, as
    recorded in OUT/_owner (pid, host, since), or None."""
    from .progress import read_owner, read_progress  # progress -> runlock for status

    progress = read_progress(output) or {}
    updated = progress.get("updated")
    if progress.get("state") != "running" or not isinstance(updated, (int, float)) \
            or time.time() - updated > RUNNING_STALE_AFTER:
        return None
    return read_owner(output) or {}
