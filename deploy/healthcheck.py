"""The worker image's health check: is the flowcraft process in this container healthy?

A worker started with ``--health-port PORT`` is asked: ``GET /healthz`` on that port must
answer 200 (its poll loop made progress recently; a stuck worker answers 503). A process
without a health port (``reconcile --every``) is checked in the process table: it runs the
``flowcraft`` command and is neither a zombie nor stopped. Exit status 0 is healthy, 1
unhealthy.

    python healthcheck.py [PROC_DIR]      # PROC_DIR defaults to /proc
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path


def flowcraft_argv(process: Path) -> list[str] | None:
    """The arguments of a live flowcraft process, or ``None`` (not flowcraft, or dead)."""
    try:
        # The state follows the parenthesised command name, which may itself hold spaces.
        state = (process / "stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = [arg.decode(errors="replace")
                for arg in (process / "cmdline").read_bytes().split(b"\0")]
    except (OSError, IndexError):
        return None  # gone meanwhile, or not a process directory
    # The console script runs as `python /usr/local/bin/flowcraft ...`.
    launched = [Path(arg).name for arg in argv[:2]]
    if state in ("Z", "T", "t", "X") or "flowcraft" not in launched:
        return None
    return argv


def health_port(argv: list[str]) -> int | None:
    for index, arg in enumerate(argv):
        if arg == "--health-port" and index + 1 < len(argv):
            return int(argv[index + 1])
        if arg.startswith("--health-port="):
            return int(arg.split("=", 1)[1])
    return None


def answers_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as reply:
            return bool(reply.status == 200)
    except OSError:  # refused, timed out, or an HTTP error status (503: stuck)
        return False


def healthy(proc: Path) -> bool:
    me = str(os.getpid())
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == me:
            continue
        argv = flowcraft_argv(entry)
        if argv is None:
            continue
        port = health_port(argv)
        return answers_healthy(port) if port is not None else True
    return False


if __name__ == "__main__":
    sys.exit(0 if healthy(Path(sys.argv[1] if len(sys.argv) > 1 else "/proc")) else 1)
