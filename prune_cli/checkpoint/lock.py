"""Who writes an output folder: the owner record (host, boot, pid and its start time, so a
dead owner is told from a live one) and the exclusive ``flock`` beside the output that two
runs writing the same folder contend for."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from prune_cli.core.errors import BadInputError, OutputLockedError

log = logging.getLogger(__name__)


class OutputNotWritableError(BadInputError):
    """The output's folder cannot be written (found at start, before any work)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), so
    a recycled PID is not mistaken for the run that wrote a folder; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class Owner:
    """The run that owns a lock or a staging folder."""

    pid: int
    host: str
    boot_id: str
    start_ticks: int | None
    started: str  # local time, for people
    stopped: bool = False  # the run ended, keeping its staging folder for --resume

    @classmethod
    def current(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, socket.gethostname(), _boot_id(), _start_ticks(pid), time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def read(cls, path: Path) -> Owner | None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(int(data["pid"]), str(data["host"]), str(data.get("boot_id", "")),
                       data.get("start_ticks"), str(data.get("started", "?")), bool(data.get("stopped", False)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the owning process still runs. Only answerable on this host; a run on
        another host counts as alive (its folders are left alone)."""
        if self.stopped:
            return False
        if not self.local:
            return True
        if self.boot_id and _boot_id() and self.boot_id != _boot_id():
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        ticks = _start_ticks(self.pid)
        return self.start_ticks is None or ticks is None or ticks == self.start_ticks

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host}, started {self.started}"


def _names(output: Path) -> tuple[str, str, str]:
    return f".{output.name}.partial-", f".{output.name}.old-", f".{output.name}.prune-cli.lock"


def _not_writable(folder: Path, output: Path, exc: OSError) -> OutputNotWritableError:
    return OutputNotWritableError(
        f"cannot write in {folder} (for --output {output}): {exc.strerror or exc}", hint="choose a writable --output"
    )


def _locked(output: Path, holder: Owner | None) -> OutputLockedError:
    who = holder.describe() if holder else "another process"
    return OutputLockedError(
        f"another prune-cli run ({who}) is writing {output}",
        hint="wait for it to finish, or choose another --output",
    )


class OutputLock:
    """An exclusive ``flock`` on ``.NAME.prune-cli.lock`` beside the output, holding the owner
    record. The kernel drops the lock when its process dies, so a lock file whose lock is free
    is stale: it is taken over (and said so)."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.parent / _names(output)[2]
        self.fd: int | None = None
        self.previous: Owner | None = None  # the dead holder of a stale lock we took over

    def acquire(self) -> OutputLock:

        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise _not_writable(self.path.parent, self.output, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked(self.output, Owner.read(self.path)) from None
            try:  # the holder may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = Owner.read(self.path)
        os.ftruncate(fd, 0)
        os.write(fd, Owner.current().to_json().encode())
        self.fd = fd
        if self.previous is not None:
            log.info("took over the stale lock %s of a run that ended (%s)", self.path.name, self.previous.describe())
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: nobody can attach to it in between
        os.close(self.fd)
        self.fd = None
