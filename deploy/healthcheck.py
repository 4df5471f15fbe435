"""The worker image's health check: is a flowcraft process alive in this container?

Workers have no health endpoint yet, so this checks the process table: some process runs
the ``flowcraft`` command (a worker, or ``reconcile --every``) and is neither a zombie nor
stopped. A worker health port will replace it. Exit status 0 is healthy, 1 unhealthy.

    python healthcheck.py [PROC_DIR]      # PROC_DIR defaults to /proc
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def runs_flowcraft(process: Path) -> bool:
    try:
        # The state follows the parenthesised command name, which may itself hold spaces.
        state = (process / "stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = (process / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False  # gone meanwhile, or not a process directory
    # The console script runs as `python /usr/local/bin/flowcraft ...`.
    launched = [Path(arg.decode(errors="replace")).name for arg in argv[:2]]
    return state not in ("Z", "T", "t", "X") and "flowcraft" in launched


def healthy(proc: Path) -> bool:
    me = str(os.getpid())
    return any(runs_flowcraft(entry) for entry in proc.iterdir()
               if entry.name.isdigit() and entry.name != me)


if __name__ == "__main__":
    sys.exit(0 if healthy(Path(sys.argv[1] if len(sys.argv) > 1 else "/proc")) else 1)
