"""How each `evalkv pred` invocation is recorded in run.json: when and where it started (host, pid, git state) and how
it ended (finished, interrupted by SIGINT / SIGTERM, failed), and, for one that could record nothing (SIGKILL),
what a later invocation can tell of it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import evalkv


def git_state(folder: Path | None = None) -> dict:
    """The commit evalkv runs from and whether tracked files differ from it (`git_dirty`): a run made from a modified
    checkout cannot be reproduced from the hash alone. Both None outside a git checkout."""
    folder = folder or Path(evalkv.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=folder).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return {"git": head, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git": None, "git_dirty": None}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_invocation() -> dict:
    return {"started": now(), "command": " ".join(sys.argv), **git_state(), "new_samples": 0,
            "host": socket.gethostname(), "pid": os.getpid()}


def settled(invocations: list[dict]) -> list[dict]:
    """Earlier invocations, each with the status it ended with. One that never recorded its end was killed
    (SIGKILL, a power cut) or is still going: `killed` when its process is gone from this host, else `unknown`.
    Invocations recorded before evalkv wrote a status ended `finished` when they have an end time."""
    entries = []
    for entry in invocations:
        entry = dict(entry)
        if "status" not in entry:
            entry["status"] = "finished" if "finished" in entry else _fate(entry)
        entries.append(entry)
    return entries


def _fate(invocation: dict) -> str:
    """`killed` when its process is gone from this host; `unknown` when it ran elsewhere, recorded no process, or its
    process id is taken (it may still be running, or the id was reused)."""
    pid = invocation.get("pid")
    if invocation.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return "unknown"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "killed"
    except OSError:  # a process of another user
        pass
    return "unknown"


class RunInterrupted(KeyboardInterrupt):
    """`evalkv pred` stopped by SIGINT or SIGTERM once it had recorded how far it got; the message says so."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised where the process is (as Python raises KeyboardInterrupt for SIGINT)."""


@contextlib.contextmanager
def sigterm_raises():
    """Within it, SIGTERM raises `Terminated` (in the main thread; elsewhere handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(number, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_of(stop: BaseException) -> int:
    return signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
