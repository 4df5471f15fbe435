"""Node implementations for the crash tests (``tests/test_crash.py``).

Worker subprocesses import this module with ``--registry crash_nodes:registry``
(``tests/`` is put on their ``PYTHONPATH``); the test process imports it too, for the
in-memory oracle run.

Every execution of a node appends two lines to the file named by
``$FLOWCRAFT_CRASH_LOG`` (when set), one ``write`` each on an ``O_APPEND`` descriptor, so
lines of concurrent processes never interleave and their order in the file is the order
in which they happened::

    <run_id> <node_id> <attempt> <pid> <execution> start
    <run_id> <node_id> <attempt> <pid> <execution> end

``<execution>`` (``<pid>-<n>``) names one execution: a worker that runs a node twice
writes two. A worker killed mid-node leaves a ``start`` without its ``end``.

Outputs depend only on the run id, the initial context and the node's input, so the
in-memory runtime computes the same values. Each node also records its ``<execution>``
under the context key ``executedBy.<node>``: that key shows which execution's writes were
committed (the test leaves it out of the comparison with the in-memory run).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import random
from typing import Any

from flowcraft import NodeContext

# The workers run with -v (the job algorithm's INFO lines are the test's diagnostics); the
# Azure SDK would log every HTTP request and its headers at INFO too, which slows the
# workers down considerably. Importing the registry (which the worker does after
# configuring logging) turns that off.
logging.getLogger("azure").setLevel(logging.WARNING)

LOG_ENVIRONMENT = "FLOWCRAFT_CRASH_LOG"
EXECUTED_BY = "executedBy."


_executions = itertools.count(1)


def _start(ctx: NodeContext) -> str:
    """Log the start of an execution; returns its name (what ``executedBy`` records)."""
    execution = f"{os.getpid()}-{next(_executions)}"
    _log(ctx, execution, "start")
    return execution


def _log(ctx: NodeContext, execution: str, event: str) -> None:
    path = os.environ.get(LOG_ENVIRONMENT)
    if not path:
        return
    line = f"{ctx.run_id} {ctx.node_id} {ctx.attempt} {os.getpid()} {execution} {event}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def _work(ctx: NodeContext) -> None:
    """A little asynchronous work (20-100 ms), so that kills land mid-node."""
    await asyncio.sleep(random.uniform(0.02, 0.1))


def run_seed(run_id: str) -> int:
    return int(hashlib.sha256(run_id.encode()).hexdigest()[:6], 16) % 1000


async def source(ctx: NodeContext) -> Any:
    execution = _start(ctx)
    n = await ctx.context.get("n")
    await _work(ctx)
    await ctx.context.set("origin", f"{ctx.run_id}/{n}")
    await ctx.context.set(EXECUTED_BY + ctx.node_id, execution)
    _log(ctx, execution, "end")
    return {"n": n, "seed": run_seed(ctx.run_id)}


async def branch(ctx: NodeContext) -> Any:
    execution = _start(ctx)
    k = int(ctx.params["k"])
    await _work(ctx)
    value = ctx.input["n"] * 100 + ctx.input["seed"] + k * k
    await ctx.context.set(f"seen_{ctx.node_id}", value)
    await ctx.context.set(EXECUTED_BY + ctx.node_id, execution)
    _log(ctx, execution, "end")
    return {"k": k, "value": value}


async def sink(ctx: NodeContext) -> Any:
    execution = _start(ctx)
    await _work(ctx)
    delivered = dict(ctx.input)
    total = sum(output["value"] for output in delivered.values())
    await ctx.context.set("total", total)
    await ctx.context.set(EXECUTED_BY + ctx.node_id, execution)
    _log(ctx, execution, "end")
    return {"total": total, "count": len(delivered), "from": sorted(delivered)}


registry = {"crash-source": source, "crash-branch": branch, "crash-sink": sink}
