"""Helpers for the command-line tests of both clouds (imported as a plain module, like
``aws_helpers``)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path


async def reconcile_every_until_three_failures(args: list[str], env: dict[str, str],
                                               cwd: Path) -> list[str]:
    """Run ``flowcraft reconcile ... --every 0.2``, collect three failure lines from its
    stderr, SIGTERM it; it must still be running then, and exit with 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "reconcile", *args, "--every", "0.2", env=env,
        cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    failures: list[str] = []
    try:
        assert process.stderr is not None
        while len(failures) < 3:
            line = (await asyncio.wait_for(process.stderr.readline(), 60)).decode()
            assert line, f"the reconciler exited ({await process.wait()}) after {failures}"
            failures.append(line)
        assert process.returncode is None
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        _out, rest = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, rest.decode()
    assert "Traceback" not in rest.decode()
    for line in failures:
        assert line.startswith("flowcraft reconcile: pass failed ("), line
        assert line.rstrip("\n").endswith("next pass in 0.2 s"), line
    return failures
