"""The output folder: which folders prune-cli may replace, the lock that keeps two runs apart,
and the staging folder a checkpoint is written into before it is moved into place.

Rules (each one a user's data-loss report in a peer tool):

* **Only replace what we wrote.** ``--overwrite`` replaces a folder only when it is empty or a
  prune-cli checkpoint: it holds a ``sparsity.json`` of prune-cli's format, and every other file
  in it is one that report lists (checkpoints written before the list existed are recognised by
  the report alone). The root folder, the home folder and the working folder (or any folder
  above it) are never replaced.
* **One run per output.** A run takes ``.NAME.prune-cli.lock`` in the parent folder for its
  whole life (``flock``: the kernel releases it when the process dies, even by SIGKILL, so a
  stale lock is simply taken over); a second run fails at once naming the holder.
* **Fail before the work, not after it.** The staging folder ``.NAME.partial-XXXX`` is created
  at start: an unwritable ``--output`` fails in the first second, not after calibration.
* **Nothing half-written.** The checkpoint is written into the staging folder and renamed onto
  ``--output`` at the very end. Replacing moves the previous checkpoint aside into
  ``.NAME.old-XXXX`` first, then removes it. Both folders carry an owner record
  (``.prune-cli-owner.json``: PID, host, boot id, process start time); a later run to the same
  output removes those whose owner is dead, and restores a previous checkpoint that a killed
  ``--overwrite`` had moved aside when nothing replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

from prune_cli.checkpoint.files import OWNER_FILE, REPORT_FILE, REPORT_FORMAT, WORK_FOLDER  # noqa: F401 - re-exported
from prune_cli.checkpoint.lock import OutputLock, OutputNotWritableError, Owner, _locked, _names, _not_writable  # noqa: F401 - OutputLock re-exported
from prune_cli.checkpoint.resume import ResumeState
from prune_cli.core.errors import BadInputError, OutputExistsError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- owners


# ----------------------------------------------------------------------------- paths


def output_path(value: str | os.PathLike | None) -> Path:
    """An ``--output`` value as a path; the empty string is refused (``Path("")`` is ``.``)."""
    if value is None or not str(value).strip():
        raise BadInputError("--output is empty", hint="pass the checkpoint folder to write, e.g. -o out/wanda-50")
    return Path(os.path.abspath(os.path.expanduser(str(value))))


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def read_report(folder: Path) -> dict | None:
    """prune-cli's report in ``folder``, or None when there is none of prune-cli's format."""
    try:
        data = json.loads((Path(folder) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == REPORT_FORMAT else None


def _protected(output: Path) -> str | None:
    """Why ``output`` may never be replaced, or None."""
    real = output.resolve()
    if real == Path(real.anchor):
        return "it is the root folder"
    with contextlib.suppress(RuntimeError, KeyError):
        if real == Path.home().resolve():
            return "it is the home folder"
    cwd = Path.cwd().resolve()
    if real == cwd:
        return "it is the current working folder"
    if cwd.is_relative_to(real):
        return "it holds the current working folder"
    return None


def _edited_files(output: Path, listed: list) -> list[str]:
    """Files of the report's list whose size is not the one recorded when they were written:
    the user edited them (the model card README.md, typically, before pushing it), and
    ``--overwrite`` would lose the edit."""
    edited = []
    for entry in listed:
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            continue
        path = output / str(entry.get("name"))
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size != entry["bytes"]:
                edited.append(str(entry.get("name")))
    return sorted(edited)


def check_replaceable(output: Path) -> None:
    """Raise unless the existing folder ``output`` may be replaced by ``--overwrite``."""
    why = _protected(output)
    if why is None and any(output.iterdir()):
        report = read_report(output)
        if report is None:
            why = f"it is not a prune-cli checkpoint (no {REPORT_FILE} written by prune-cli)"
        elif isinstance(report.get("files"), list):
            listed = {str(f.get("name")) for f in report["files"] if isinstance(f, dict)} | {REPORT_FILE}
            foreign = sorted(str(p.relative_to(output)) for p in output.rglob("*") if not p.is_dir() and str(p.relative_to(output)) not in listed)
            if foreign:
                more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
                why = f"it holds files prune-cli did not write ({foreign[0]}{more})"
            else:
                edited = _edited_files(output, report["files"])
                if edited:
                    more = f" and {len(edited) - 1} more" if len(edited) > 1 else ""
                    why = f"{edited[0]}{more} changed since prune-cli wrote it (an edited model card?)"
    if why:
        raise OutputExistsError(
            f"refusing to replace {output}: {why}",
            hint="prune-cli only replaces folders it wrote; choose another --output",
        )


# what prune-cli adds to --output's name for the folders it writes beside it: the staging folder
# ".NAME.partial-" + 8 random characters (tempfile.mkdtemp) is the longest
_BESIDE_BYTES = len(".") + len(".partial-") + 8


def check_name_lengths(output: Path) -> None:
    """Refuse an ``--output`` whose name cannot be made on its file system: a name longer than
    the file system's limit per name (255 bytes on most), or one so long that the staging folder
    beside it (``.NAME.partial-XXXXXXXX``) would be, or a path beyond the path limit. (The
    operating system says "File name too long" only at the first write, and for the staging
    folder that reads as if the parent were not writable.)"""
    ancestor = output.parent
    while True:  # the nearest existing folder (a too-long name does not exist: stat says so)
        try:
            if ancestor.exists():
                break
        except OSError:
            pass
        ancestor = ancestor.parent
    try:
        name_max, path_max = os.pathconf(ancestor, "PC_NAME_MAX"), os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    hint = "choose a shorter --output"
    for part in output.parts[1:]:
        size = len(os.fsencode(part))
        if size > name_max:
            raise OutputNotWritableError(f"--output name too long: {part[:32]}... is {size} bytes, the file system allows "
                                         f"{name_max} per name", hint=hint)
    size = len(os.fsencode(output.name)) + _BESIDE_BYTES
    if size > name_max:
        raise OutputNotWritableError(
            f"--output name too long: {output.name[:32]}... is {size - _BESIDE_BYTES} bytes, and prune-cli writes "
            f".NAME.partial-XXXXXXXX beside it ({size} bytes; the file system allows {name_max} per name)",
            hint=f"choose an --output name of at most {name_max - _BESIDE_BYTES} bytes")
    if len(os.fsencode(str(output))) + _BESIDE_BYTES >= path_max:
        raise OutputNotWritableError(f"--output path too long: {len(os.fsencode(str(output)))} bytes, the file system "
                                     f"allows {path_max} per path (less what prune-cli adds)", hint=hint)


def check_output(output: Path, overwrite: bool) -> None:
    """What needs no writing: ``output`` may be created, or replaced with ``overwrite``."""
    check_name_lengths(output)
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise OutputExistsError(f"output exists and is not a folder: {output}", hint="choose another --output")
        if not overwrite:
            raise OutputExistsError(f"output exists: {output}", hint="pass --overwrite to replace it, or choose another --output")
        check_replaceable(output)
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputNotWritableError(f"cannot create {output}: {ancestor} is not a folder", hint="choose another --output")


_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_errno(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``: an ``OSError``'s, or the ``(os error N)`` that
    safetensors' writer puts in its message (it raises its own error type)."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":

        found = re.search(r"\(os error (\d+)\)", str(exc))
        return int(found.group(1)) if found else None
    return None


@contextlib.contextmanager
def disk_full_named(folder: Path, output: Path | None = None):
    """A full disk or quota (ENOSPC, EDQUOT) while a run writes is an
    :class:`OutputNotWritableError` (exit 2) saying there is no space left on ``folder`` (the
    folder of the file, when the error names it), not an internal error."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - only a full disk is translated
        if os_errno(exc) not in _FULL:
            raise
        filename = getattr(exc, "filename", None)
        where = Path(filename).parent if filename else folder
        what = f" while writing --output {output} (nothing was written to it)" if output is not None else ""
        raise OutputNotWritableError(
            f"no space left on {where}{what}: {os.strerror(os_errno(exc))}",
            hint="free some space, or choose an --output (and TMPDIR) on a file system with room",
        ) from None


def preflight(output: Path, overwrite: bool) -> None:
    """Everything a real run would refuse, checked without leaving anything behind (for
    ``--dry-run``): the folder rules, a lock held by a live run, and writability (a probe
    folder made and removed in the nearest existing folder)."""
    check_output(output, overwrite)
    _, _, lock_name = _names(output)
    lock = output.parent / lock_name
    if lock.exists():
        with contextlib.suppress(OSError), open(lock, "rb") as handle:

            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _locked(output, Owner.read(lock)) from None
    ancestor = output.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prune-cli-probe-", dir=ancestor))
    except OSError as exc:
        raise _not_writable(ancestor, output, exc) from None


# ----------------------------------------------------------------------------- the lock


# ----------------------------------------------------------------------------- leftovers


def _remove_owned(folder: Path) -> None:
    """Remove ``folder`` with its owner record last, so an interrupted removal still says whose
    it was."""
    for child in list(folder.iterdir()) if folder.is_dir() else []:
        if child.name == OWNER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    with contextlib.suppress(OSError):
        (folder / OWNER_FILE).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _resumable(folder: Path) -> dict | None:
    """The resume state an interrupted run left in staging ``folder``, when it finished at least
    one block (:mod:`prune_cli.checkpoint.resume`)."""

    state = ResumeState.saved_progress(folder)
    return state if state and (state.get("blocks_done") or state.get("finished")) else None


def resumable_staging(output: Path) -> Path | None:
    """The staging folder that a run to ``output`` with ``--resume`` would adopt (as
    :func:`clean_leftovers` finds it: a run that ended, with resume state; the newest), found
    without changing anything (for ``--dry-run``); None when there is none."""
    partial, _, _ = _names(output)
    try:
        entries = [e for e in output.parent.iterdir() if e.name.startswith(partial)]
    except OSError:
        return None
    found = []
    for folder in entries:
        if not folder.is_dir() or folder.is_symlink():
            continue
        owner = Owner.read(folder / OWNER_FILE)
        if owner is not None and not owner.alive() and _resumable(folder) is not None:
            found.append(folder)
    found.sort(key=lambda f: (f / WORK_FOLDER / "resume" / "state.json").stat().st_mtime, reverse=True)
    return found[0] if found else None


def describe_progress(state: dict) -> str:
    walks = len(state.get("finished") or {})
    return f"{state.get('blocks_done', 0)} blocks done over {walks} finished walk(s), saved {state.get('written', '?')}"


def clean_leftovers(output: Path, keep_resumable: bool = False) -> tuple[list[str], list[Path]]:
    """Deal with staging (``.NAME.partial-*``) and replaced (``.NAME.old-*``) folders that
    earlier runs to ``output`` left behind: remove those of dead runs on this host, restore a
    previous checkpoint that a killed ``--overwrite`` moved aside when nothing replaced it, and
    report the rest. A dead run's staging folder that holds resume state is kept (and returned,
    newest first) with ``keep_resumable``. Call with the output's lock held. Returns the
    messages (also logged) and the resumable folders."""
    partial, old, _ = _names(output)
    messages: list[str] = []
    resumable: list[Path] = []
    parent = output.parent
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return messages
    # replaced checkpoints first: one may have to go back to `output`
    for folder in [e for e in entries if e.name.startswith(old)] + [e for e in entries if e.name.startswith(partial)]:
        if not folder.is_dir() or folder.is_symlink():
            continue
        kind = "replaced-checkpoint" if folder.name.startswith(old) else "staging"
        owner = Owner.read(folder / OWNER_FILE)
        size = _mb(_size(folder))
        if owner is None:
            msg = (f"found {folder} ({kind} folder, {size}) with no owner record, probably from an older prune-cli; "
                   "left alone: remove it if no run is using it")
            log.warning(msg)
        elif owner.alive():
            msg = f"found {folder} ({kind} folder, {size}) of a live run ({owner.describe()}); left alone"
            log.warning(msg)
        elif kind == "staging" and keep_resumable and (state := _resumable(folder)) is not None:
            resumable.append(folder)
            msg = (f"found {folder.name}, the resume state of an interrupted run ({owner.describe()}; "
                   f"{describe_progress(state)}): kept")
            log.info(msg)
        elif kind == "replaced-checkpoint" and (folder / "old").is_dir() and not output.exists():
            os.replace(folder / "old", output)
            _remove_owned(folder)
            msg = (f"restored the previous checkpoint at {output}, which an interrupted --overwrite "
                   f"({owner.describe()}) had moved aside to {folder.name}")
            log.warning(msg)
        else:
            _remove_owned(folder)
            msg = f"removed {folder.name} ({kind} folder, {size}) left by a run that ended ({owner.describe()})"
            log.warning(msg)
        messages.append(msg)
    resumable.sort(key=lambda f: (f / WORK_FOLDER / "resume" / "state.json").stat().st_mtime, reverse=True)
    return messages, resumable


# ----------------------------------------------------------------------------- the target


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM for the few renames of a swap; they arrive right after it."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fix_modes(folder: Path) -> None:
    """Give every file and folder under ``folder`` the user's umask (temporary files are 0600,
    mkdtemp folders 0700; a checkpoint is an ordinary folder)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


class OutputTarget:
    """Owns ``--output`` for one run: use as a context manager around the whole job.

    On enter: the folder rules, missing parents made, the lock taken, leftovers of dead runs
    cleaned, and the staging folder made (proving the parent writable). :meth:`commit` moves
    the finished staging folder onto the output. On exit without commit (error, Ctrl-C,
    SIGTERM) the staging folder is removed, parents this run made are removed again, and the
    lock released: ``state`` then says what the output holds ("absent" or "previous").

    Resume (``resume``): a dead run's staging folder with resume state is never removed by
    another run that did not ask: ``resume=True`` adopts the newest one as this run's staging
    folder (:attr:`adopted`), ``None`` keeps them (and says so), ``False`` (``--no-resume``)
    removes them. A run that stops with resume state worth keeping (:attr:`keep_for_resume`)
    leaves its staging folder in place; a run that commits removes the resume states it
    superseded.
    """

    def __init__(self, output: Path, overwrite: bool, resume: bool | None = None):
        self.output = output_path(output)
        self.overwrite = overwrite
        self.resume = resume
        self.adopted = False
        self.keep_for_resume = False
        self.superseded: list[Path] = []
        self.staging: Path | None = None
        self.lock = OutputLock(self.output)
        self.created_parents: list[Path] = []
        self.committed = False
        self.notes: list[str] = []

    @property
    def state(self) -> str:
        if self.committed:
            return "written"
        if self.keep_for_resume:
            return "resumable"
        return "previous" if self.output.exists() else "absent"

    def __enter__(self) -> OutputTarget:
        check_output(self.output, self.overwrite)
        try:
            self._make_parents()
            self.lock.acquire()
            self.notes, resumable = clean_leftovers(self.output, keep_resumable=self.resume is not False)
            check_output(self.output, self.overwrite)  # a restored checkpoint counts as existing
            partial, _, _ = _names(self.output)
            try:
                if self.resume and resumable:
                    self.staging, self.adopted = resumable[0], True
                    log.info("resuming the interrupted run in %s", self.staging.name)
                    resumable = resumable[1:]
                else:
                    if self.resume:
                        log.info("nothing to resume for %s: starting from the first block", self.output)
                    self.staging = Path(tempfile.mkdtemp(prefix=partial, dir=self.output.parent))
                    for folder in resumable:
                        log.warning("kept %s, the resume state of an interrupted run: rerun with --resume to continue "
                                    "it (or --no-resume to remove it)", folder.name)
                self.superseded = resumable
                (self.staging / OWNER_FILE).write_text(Owner.current().to_json(), encoding="utf-8")
            except OSError as exc:
                raise _not_writable(self.output.parent, self.output, exc) from None
        except BaseException:
            self._undo()
            raise
        return self

    def check_free_space(self, needed_bytes: int) -> None:
        """Refuse to start the long work when the output's file system cannot hold the
        checkpoint (``needed_bytes``, the weights' size plus a small margin): a full disk is
        otherwise found only at export. A replaced checkpoint is freed only after the new one
        is in place, so it does not count as free space."""
        free = shutil.disk_usage(self.output.parent).free
        needed = int(needed_bytes * 1.02) + (16 << 20)
        if free < needed:
            raise OutputNotWritableError(
                f"not enough free space for --output {self.output}: the checkpoint needs about {_mb(needed)}, "
                f"{_mb(free)} free",
                hint="free some space or choose another --output",
            )

    def _make_parents(self) -> None:
        missing = []
        ancestor = self.output.parent
        while not ancestor.exists():
            missing.append(ancestor)
            ancestor = ancestor.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise _not_writable(folder.parent, self.output, exc) from None
            self.created_parents.append(folder)

    def commit(self) -> Path:
        """Move the staging folder onto the output (replacing a previous checkpoint)."""
        assert self.staging is not None
        _, old, _ = _names(self.output)
        with _signals_held():
            shutil.rmtree(self.staging / WORK_FOLDER, ignore_errors=True)  # resume state, blocks kept between walks
            fix_modes(self.staging)
            if self.output.exists():
                check_replaceable(self.output)  # it may have changed during the run
                trash = Path(tempfile.mkdtemp(prefix=old, dir=self.output.parent))
                (trash / OWNER_FILE).write_text(Owner.current().to_json(), encoding="utf-8")
                os.replace(self.output, trash / "old")
                (self.staging / OWNER_FILE).unlink()
                os.replace(self.staging, self.output)
                self.committed = True
                _remove_owned(trash)
            else:
                (self.staging / OWNER_FILE).unlink()
                os.replace(self.staging, self.output)
                self.committed = True
        self.staging = None
        for folder in self.superseded:  # resume states of runs this one replaced
            owner = Owner.read(folder / OWNER_FILE)
            if owner is None or not owner.alive():
                _remove_owned(folder)
                log.info("removed %s, the resume state of an earlier run that this checkpoint supersedes", folder.name)
        return self.output

    def _undo(self) -> None:
        if self.staging is not None and self.keep_for_resume:

            stopped = replace(Owner.current(), stopped=True)
            with contextlib.suppress(OSError):
                (self.staging / OWNER_FILE).write_text(stopped.to_json(), encoding="utf-8")
        elif self.staging is not None:
            _remove_owned(self.staging)
            self.staging = None
        if not self.committed:
            for folder in reversed(self.created_parents):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when still empty
        self.lock.release()

    def __exit__(self, exc_type, exc, tb) -> None:
        with _signals_held():
            self._undo()
        if exc is not None and hasattr(exc, "__dict__"):
            exc.output_state = self.state  # for the CLI's one line about what is on disk
