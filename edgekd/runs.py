"""Run folders under artifacts/, the latest-run lookup, atomic writes and the metrics.jsonl log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from edgekd.errors import EdgekdError

log = logging.getLogger(__name__)

ARTIFACTS_ENV = "EDGEKD_ARTIFACTS"


def artifacts_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get(ARTIFACTS_ENV) or "artifacts")


# ----- atomic writes ------------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes a killed process never renamed (never the real files)."""
    stale = sorted(folder.glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def interrupts_deferred():
    """Let a block of writes finish before Ctrl-C (SIGINT) takes effect; it is raised right after.

    Outside the main thread (where signal handlers cannot be set) the block runs unprotected. A process that
    ignores SIGINT (started with `nohup` or `&` from a script) keeps ignoring it here too: deferring must not
    turn a signal the process never reacts to into an interrupt, only while it happens to be saving.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if not received:
        return
    if callable(previous):  # Python's own default_int_handler raises KeyboardInterrupt; another handler decides
        previous(signal.SIGINT, None)
    else:
        raise KeyboardInterrupt


# ----- run folders --------------------------------------------------------------------------------------

def _numbered(root: Path, name: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"^{re.escape(name)}(?:-(\d+))?$")
    found = []
    for child in _children(root):
        match = pattern.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1) or 1), child))
    return sorted(found)


def new_run_dir(root: Path, name: str) -> Path:
    """artifacts/<name>, or <name>-2, -3, ... when earlier runs exist (never overwrite a run)."""
    check_writable(root)
    existing = _numbered(root, name)
    number = existing[-1][0] + 1 if existing else 1
    run_dir = root / (name if number == 1 else f"{name}-{number}")
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise _unwritable(root, exc) from None
    return run_dir


def check_writable(root: Path, keep: bool = True) -> None:
    """Prove a file can be written in folder `root` (made if missing); EdgekdError if not. With keep=False
    the folders it made are removed again, so a check before any work leaves nothing behind."""
    missing = [p for p in (root, *root.parents) if not os.path.lexists(p)]
    try:
        for attempt in range(10):
            try:
                root.mkdir(parents=True, exist_ok=True)
                fd, probe = tempfile.mkstemp(prefix=".edgekd-write-check.", dir=root)
                break
            # Another run's check (keep=False) removed the folders it had made while this one made them again
            # (ENOENT), or between pathlib's mkdir and its is_dir (EEXIST); a file in root's place fails every time.
            except (FileNotFoundError, FileExistsError):
                if attempt == 9:
                    raise
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _unwritable(root, exc) from None
    finally:
        for folder in [] if keep else missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _unwritable(root: Path, exc: OSError) -> EdgekdError:
    return EdgekdError(f"cannot write runs under {root}/: {exc.strerror or exc}",
                       hint="pass --artifacts DIR (or set EDGEKD_ARTIFACTS) to a folder you can write")


def run_dirs(root: Path, name: str) -> list[Path]:
    """Every run folder of recipe `name` under `root`, newest (highest number) first."""
    return [run_dir for _, run_dir in reversed(_numbered(root, name))]


def latest_run_dir(root: Path, name: str, needs: str | None = None) -> Path | None:
    """The newest run of recipe `name` (optionally only runs holding file `needs`)."""
    for _, run_dir in reversed(_numbered(root, name)):
        if needs is None or _is_file(run_dir / needs):
            return run_dir
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a folder this user may not read
        return False


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json ({} when missing or unreadable), its status settled on the way.

    A run whose process died without a word (SIGKILL, power loss, OOM killer) still says `running`; when
    that process is known to be gone, the summary is rewritten as `interrupted` so every command that
    looks at the run afterwards (resume, report, sweep, the newest-run lookup) sees the truth.
    """
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    problem = summary_problem(summary)
    if problem:
        _warn_once(path, f"{path} is damaged ({problem}); the run is skipped")
        return {}
    if summary.get("status") == "running" and owner_alive(summary) is False:
        summary = _settle_as_interrupted(path, summary)
    return summary


# What every reader of a summary relies on; a field of another type means the file is not edgekd's.
_SUMMARY_FIELDS = {"status": str, "mode": str, "run": str, "updated": str, "process": dict, "epochs_done": int,
                   "best_val_acc": (int, float), "best_epoch": int}


def summary_problem(summary) -> str | None:
    """Why a parsed summary.json cannot be trusted (None when it can): JSON of the wrong shape."""
    if not isinstance(summary, dict):
        return f"a {type(summary).__name__}, not a mapping"
    for key, kind in _SUMMARY_FIELDS.items():
        if summary.get(key) is not None and not isinstance(summary[key], kind):
            return f"{key} is {summary[key]!r}"
    return None


_warned: set[str] = set()


def _warn_once(path: Path, message: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        log.warning("%s", message)


def _settle_as_interrupted(path: Path, summary: dict) -> dict:
    owner = summary.get("process") or {}
    summary = {**summary, "status": "interrupted",
               "error": f"its process (pid {owner.get('pid')} on {owner.get('host')}) ended without finishing",
               "interrupted_noticed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        atomic_write_json(path, summary)
    except OSError:  # a read-only run folder: report the truth without recording it
        pass
    return summary


# ----- who runs a run -----------------------------------------------------------------------------------

def process_identity() -> dict:
    """What identifies this process later, even after its pid is reused: pid, host, start time."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start_ticks": _start_ticks(pid)}


def _start_ticks(pid: int) -> int | None:
    """A live process's start time in clock ticks after boot (Linux); None when there is no such process
    or it is a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name before ')' may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])  # state is field 3, start time field 22


def owner_alive(summary: dict) -> bool | None:
    """Whether the process that wrote a summary still runs: True, False, or None when this machine cannot
    tell (written on another host, or by an edgekd that did not record its process)."""
    owner = summary.get("process")
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2 ** 31:
        return None
    if not Path("/proc/self/stat").is_file():  # no /proc (macOS): a reused pid would pass for the owner
        return _pid_exists(pid)
    ticks = _start_ticks(pid)
    return ticks is not None and owner.get("start_ticks") in (None, ticks)


def still_running(run_dir: Path) -> dict | None:
    """The live process training a run (pid, host, start time), or None when nothing is writing to it.

    None also when its owner is on another machine (this one cannot tell) — such a run's status says so.
    """
    summary = read_summary(run_dir)
    if summary.get("status") == "running" and owner_alive(summary):
        return summary["process"]
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def latest_run(root: Path, mode: str | None = None, needs: str = "best.pt") -> Path | None:
    """The most recently updated run under `root` (optionally of a mode: train or distill)."""
    candidates = []
    for run_dir in _children(root):
        try:
            summary = read_summary(run_dir) if run_dir.is_dir() else {}
            if summary and (run_dir / needs).is_file() and (mode is None or summary.get("mode") == mode):
                candidates.append((summary.get("updated") or "", run_dir.stat().st_mtime, str(run_dir)))
        except OSError as exc:  # one unreadable folder must not hide every other run
            _warn_once(run_dir, f"{run_dir} is unreadable ({exc.strerror or exc}); skipped")
    return Path(max(candidates)[2]) if candidates else None


def _children(root: Path) -> list[Path]:
    try:
        return list(root.iterdir()) if root.is_dir() else []
    except OSError:
        return []


# ----- metrics.jsonl ------------------------------------------------------------------------------------

class MetricsLog:
    """One JSON line per finished epoch, appended and fsynced; a torn last line is dropped on read."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line torn by a crash: it and anything after it never finished
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                break  # not a line edgekd wrote: the log is trusted no further
            records.append(record)
        return records

    def truncate_to_epoch(self, epoch: int) -> list[dict]:
        """Keep the records of epochs 1..epoch (those the checkpoint holds); rewrite atomically."""
        kept = [r for r in self.read() if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

