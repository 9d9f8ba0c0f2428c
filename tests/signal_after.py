"""`python tests/signal_after.py N SIGNAL <evalkv arguments>`: run evalkv in this process, which sends itself SIGNAL
(a name: SIGINT, SIGTERM, SIGKILL) right after its N-th record reaches the disk. A real signal to a real process, at
a point that does not depend on how fast the machine is: a test polling the output and signalling the process could
see the run finish first on a busy machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from evalkv import records
from evalkv.cli import main


def run_signalled(count: int, signal_name: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """`evalkv ARGUMENTS` in a new process that sends itself `signal_name` after its `count`-th record."""
    return subprocess.run([sys.executable, str(Path(__file__)), str(count), signal_name, *arguments],
                          capture_output=True, text=True, timeout=300)


def _install(count: int, signum: int) -> None:
    write, written = records.RecordWriter.write, []

    def write_then_signal(self, record):
        write(self, record)
        written.append(record)
        if len(written) == count:
            os.kill(os.getpid(), signum)

    records.RecordWriter.write = write_then_signal


if __name__ == "__main__":
    # Ctrl-C reaches a process whose SIGINT has Python's handler. A process started from a background job of a
    # non-interactive shell (`.ci/run ... &`) inherits SIGINT ignored, and Python then installs no handler, so the
    # signal would be ignored as the shell meant: give this process the handler an interactive run has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _install(int(sys.argv[1]), getattr(signal, sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
