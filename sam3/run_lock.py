"""One process per folder: an exclusive `fcntl.flock` on FOLDER/.lock while a run (or a stage) works in it.

    with run_lock(run_dir, "training run"):   # RunLocked (a Sam3Error) if another live process holds it
        ...                                    # read and write run_dir

Why flock on an open file, not "create the file if absent": the kernel drops the lock when the holder's last
descriptor closes, which happens however the process ends (SIGKILL, OOM killer, power cut of a node). So a lock
left by a dead process is simply taken over, with no stale-lock heuristics; the file's content (pid, host, start
time, as JSON) is only information, read to name the holder in the error.

Rules:
- Taken with LOCK_NB: a second taker fails at once with one line naming the folder and the holder, it never
  waits. It opens the lock file without truncating it, so a refused taker changes nothing in the folder.
- Re-entrant within a process: a nested `run_lock` of a folder this process holds passes (the train CLI holds
  the run folder while it writes params.yaml, then `sam3.trainer.train` takes it again).
- Handed down to child processes: while a process holds a lock, HOLDER_ENV holds its pid, and a child it starts
  then (torch's elastic launcher starts the DDP workers as children of the CLI process that holds the run folder)
  passes a held lock whose file names that pid on this host when that pid is also its parent's. Both must agree:
  the variable says the parent meant to hand its locks down, the parent pid that it is still the parent (an
  orphan, or a process that merely inherited the variable further down, is refused).
- On release the lock file is removed (and a folder the lock itself had to create, if it is still empty), so a
  finished run or stage leaves nothing behind: DVC outputs hold no lock file. Removing a lock file races with a
  taker that opened it just before: that taker then locks a file no longer in the folder, so after flock it
  checks that its descriptor is still the file at FOLDER/.lock, and starts over when it is not.
- Per process, not per thread: threads of the holder share its lock.
- Without fcntl (Windows) there is no lock: a debug log says so and the body runs. A file system that refuses
  flock (some network mounts) gets a warning and no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sam3.errors import Sam3Error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HOLDER_ENV = "SAM3_RUN_LOCK_HOLDER"
# Each retry needs a holder to release between our open and our flock; more than a few in a row means a
# misbehaving process that keeps replacing the file.
_ATTEMPTS = 5


class RunLocked(Sam3Error):
    """Another live process holds the folder's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says: pid, host name, start time (ISO 8601, UTC)."""

    pid: int | None
    host: str
    started: str

    @classmethod
    def me(cls) -> Holder:
        started = datetime.now(UTC).isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=started)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file names, or None for an empty or unreadable one (a holder still writing it)."""
        try:
            data = json.loads(text)
            return cls(pid=int(data["pid"]), host=str(data["host"]), started=str(data["started"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


@dataclass
class _Held:
    fd: int
    depth: int
    created: list[Path]  # folders the lock created, deepest first: removed on release when empty


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()
_env_before: list[str | None] = []  # HOLDER_ENV before this process took its first lock


@contextlib.contextmanager
def run_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold FOLDER/.lock for the body (the folder is created when missing); RunLocked when another live process
    holds it. `what` names the kind of work in the error ("another training run")."""
    folder = Path(folder)
    if fcntl is None:
        log.debug("no fcntl on this platform: %s is not locked against a second %s", folder, what)
        yield
        return
    created = _missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
        else:
            fd = _acquire(folder, what, created)
            if fd is not None:
                held = _held[key] = _Held(fd, 1, created)
                _set_holder_env()
    try:
        yield
    finally:
        if held is not None:
            with _held_guard:
                held.depth -= 1
                if held.depth == 0:
                    del _held[key]
                    _release(folder, held)
                    _restore_holder_env()


def _acquire(folder: Path, what: str, created: list[Path]) -> int | None:
    """The descriptor holding the lock; None when there is no lock to hold (covered by the parent, or a file
    system without flock). Raises RunLocked naming the holder."""
    path = folder / LOCK_FILE
    for _ in range(_ATTEMPTS):
        # no O_TRUNC: a refused taker must not wipe the holder's information
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            if _started_by(holder):
                log.debug("%s is held by our parent process (%s); working under its lock", folder, holder.describe())
                return None
            who = holder.describe() if holder is not None else "a process whose lock file is still being written"
            raise RunLocked(
                f"{folder} is in use by another {what} ({who}); wait for it to end or stop it. The lock "
                f"({path}) goes with that process, so once it has ended the folder is free again."
            ) from None
        except OSError as err:  # flock not supported here (ENOLCK, EOPNOTSUPP on some network file systems)
            os.close(fd)
            _remove_created(created)
            log.warning("cannot lock %s (%s); going on without protection against a second %s", path, err, what)
            return None
        if _is_current(fd, path):
            holder = Holder.me()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
            log.debug("locked %s (%s)", folder, holder.describe())
            return fd
        os.close(fd)  # the file we locked was removed by a holder releasing it: lock the new one
    raise RunLocked(f"{path} keeps being replaced while we try to lock it; is some process deleting it?")


def _release(folder: Path, held: _Held) -> None:
    path = folder / LOCK_FILE
    # unlink before close: while we still hold the lock nobody else can own this file, so it is ours to remove
    with contextlib.suppress(OSError):
        if _is_current(held.fd, path):
            path.unlink()
    os.close(held.fd)  # the kernel drops the lock with the last descriptor
    _remove_created(held.created)


def _is_current(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (same device and inode)."""
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _started_by(holder: Holder | None) -> bool:
    """Whether `holder` is our parent process, which started us while holding its locks (HOLDER_ENV)."""
    return (
        holder is not None
        and holder.host == socket.gethostname()
        and os.environ.get(HOLDER_ENV) == str(holder.pid)
        and os.getppid() == holder.pid
    )


def _set_holder_env() -> None:
    if not _env_before:
        _env_before.append(os.environ.get(HOLDER_ENV))
    os.environ[HOLDER_ENV] = str(os.getpid())


def _restore_holder_env() -> None:
    if _held or not _env_before:
        return
    before = _env_before.pop()
    if before is None:
        os.environ.pop(HOLDER_ENV, None)
    else:
        os.environ[HOLDER_ENV] = before


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Remove the folders the lock created, deepest first, as long as they are empty (the work put nothing there)."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: the work wrote there, keep it and its parents
            return
