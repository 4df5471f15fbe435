"""Helpers shared by ``bench/aws_calls.py`` and ``bench/azure_calls.py``.

* the node registry the worker processes load (``--registry _shared:registry``
  with ``bench/`` on ``PYTHONPATH``): one trivial node, ``step``;
* blueprint builders for the benchmark shapes, and a blueprint directory for
  ``flowcraft worker --blueprints``;
* starting, waiting for and stopping ``python -m flowcraft worker`` processes
  (each prints its service-call counter when stopped with SIGTERM);
* starting runs and waiting for them, with a time limit on every wait;
* table and verdict printing.

Only the standard library is imported at module level, so the worker processes
that import this module for its registry pay nothing for the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REGISTRY_SPEC = "_shared:registry"
WORKER_READY = "flowcraft worker ("
WORKER_CALLS_PREFIX = "flowcraft worker: service calls "  # flowcraft.cli.WORKER_CALLS_PREFIX
REFERENCE_CALLS_PER_NODE = 12.0
"""The reference design's cost of one node, estimated from its algorithm (not measured):
a status touch, several context reads, separate output and delta writes, a send per
successor and a delete per message - about 12 service calls."""


# -- the node registry (imported by the worker processes) -------------------------------------


async def step(ctx: Any) -> Any:
    """A trivial node: input + 1; a join (a mapping of inputs) returns the sum of its values."""
    value = ctx.input
    if isinstance(value, Mapping):
        return sum(v for v in value.values() if isinstance(v, int | float))
    return (value if isinstance(value, int | float) else 0) + 1


registry = {"step": step}


# -- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One blueprint and how many nodes one run of it executes."""

    name: str
    blueprint: dict[str, Any]
    nodes: int
    joins: int  # nodes with more than one predecessor

    @property
    def id(self) -> str:
        return str(self.blueprint["id"])


def chain(n: int) -> Shape:
    """``n0 -> n1 -> ... -> n(n-1)``."""
    nodes = [{"id": f"n{i}", "uses": "step"} for i in range(n)]
    edges = [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)]
    return Shape(f"chain-{n}", {"id": f"bench-chain-{n}", "nodes": nodes, "edges": edges}, n, 0)


def fan(branches: int) -> Shape:
    """``source -> {b0 .. b(branches-1)} -> sink``; the sink is an ``all`` join."""
    nodes = [{"id": "source", "uses": "step"}]
    nodes += [{"id": f"b{i}", "uses": "step"} for i in range(branches)]
    nodes.append({"id": "sink", "uses": "step", "config": {"joinStrategy": "all"}})
    edges = [{"source": "source", "target": f"b{i}"} for i in range(branches)]
    edges += [{"source": f"b{i}", "target": "sink"} for i in range(branches)]
    return Shape(f"fan-{branches}", {"id": f"bench-fan-{branches}", "nodes": nodes,
                                     "edges": edges}, branches + 2, 1)


SHAPE_BUILDERS = {"chain": lambda: chain(50), "fan": lambda: fan(100)}
"""The request-count shapes: a 50-node chain and a 100-branch fan-out/fan-in."""


def throughput_mix(runs: int) -> list[Shape]:
    """``runs`` 20-branch fan-out/fan-in runs with a 25-node chain before every fifth."""
    mix: list[Shape] = []
    for index in range(runs):
        if index % 5 == 0:
            mix.append(chain(25))
        mix.append(fan(20))
    return mix


def parse_shapes(text: str) -> list[Shape]:
    """``chain,fan`` (the defaults) or explicit sizes: ``chain:50,fan:100``."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, size = part.partition(":")
        if name not in SHAPE_BUILDERS:
            raise ValueError(f"unknown shape {name!r} (choose from chain, fan; e.g. chain:50)")
        shapes.append((chain if name == "chain" else fan)(int(size)) if size
                      else SHAPE_BUILDERS[name]())
    return shapes


def parse_ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def write_blueprints(directory: Path, shapes: Iterable[Shape]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        (directory / f"{shape.id}.json").write_text(json.dumps(shape.blueprint),
                                                     encoding="utf-8")


def runtime_options(shapes: Iterable[Shape]) -> Any:
    """``FlowRuntime(...).options`` for the client side (blueprints + registry)."""
    from flowcraft import FlowRuntime, WorkflowBlueprint

    blueprints = {s.id: WorkflowBlueprint.model_validate(s.blueprint) for s in shapes}
    return FlowRuntime(blueprints=blueprints, registry=registry).options


# -- worker processes -------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    calls: Counter[str] = field(default_factory=Counter)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def worker_environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR),
                                                   env.get("PYTHONPATH", "")) if p)
    return env


def start_workers(backend: str, count: int, blueprint_dir: Path, log_dir: Path,
                  env: Mapping[str, str], concurrency: int, tag: str = "w",
                  ready_timeout: float = 60.0) -> list[WorkerProcess]:
    """Start ``count`` ``python -m flowcraft worker BACKEND`` processes; wait until each has
    printed its start-up line (they are polling then). Raises RuntimeError on failure."""
    command = [sys.executable, "-m", "flowcraft", "worker", backend, "--registry",
               REGISTRY_SPEC, "--blueprints", str(blueprint_dir),
               "--concurrency", str(concurrency)]
    workers = []
    for index in range(count):
        log_path = log_dir / f"worker-{backend}-{tag}{index}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the child process
        process = subprocess.Popen(command, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=str(BENCH_DIR))
        log.close()
        workers.append(WorkerProcess(process, log_path))
    deadline = time.monotonic() + ready_timeout
    for worker in workers:
        while WORKER_READY not in worker.log():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                stop_workers(workers)
                raise RuntimeError(f"worker did not start (exit {worker.process.poll()}): "
                                   f"{tail(worker.log())}")
            time.sleep(0.05)
    return workers


def stop_workers(workers: Sequence[WorkerProcess], timeout: float = 40.0) -> None:
    """SIGTERM every worker, wait (then SIGKILL), and parse each one's call counter."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        for line in worker.log().splitlines():
            if line.startswith(WORKER_CALLS_PREFIX):
                worker.calls = Counter(json.loads(line[len(WORKER_CALLS_PREFIX):]))


def tail(text: str, lines: int = 4) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:500]


# -- runs -------------------------------------------------------------------------------------


@dataclass
class RunBatch:
    """Runs started together and what became of them."""

    run_ids: list[str]
    expected_nodes: dict[str, int]
    started: float = 0.0
    finished: float | None = None  # when the last run was seen resting
    statuses: dict[str, str] = field(default_factory=dict)
    executed: int = 0  # _outputs.* keys over the runs that were loaded
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and len(self.statuses) == len(self.run_ids) and all(
            s == "completed" for s in self.statuses.values())

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


async def start_runs(client: Any, shapes: Sequence[Shape], prefix: str) -> RunBatch:
    """Start one run per entry of ``shapes`` (a shape may repeat) as fast as possible."""
    batch = RunBatch([], {})
    batch.started = time.perf_counter()
    for index, shape in enumerate(shapes):
        await _start(client, batch, shape, f"{prefix}-{index}-{shape.name}")
    return batch


async def _start(client: Any, batch: RunBatch, shape: Shape, run_id: str) -> str:
    await client.start_workflow(shape.id, {}, run_id=run_id)
    batch.run_ids.append(run_id)
    batch.expected_nodes[run_id] = shape.nodes
    return run_id


RESTING = ("completed", "failed", "cancelled", "awaiting")


async def wait_runs(client: Any, batch: RunBatch, timeout: float, poll: float = 0.2,
                    load: bool = True) -> RunBatch:
    """Wait for every run to rest. Polls one pending run at a time (the local servers are
    CPU-bound; polling every run every interval would slow the workers down)."""
    deadline = time.monotonic() + timeout
    pending = list(batch.run_ids)
    while pending:
        run_id = pending[0]
        state = ((await client.get_run_status(run_id)) or {}).get("status")
        if state in RESTING:
            batch.statuses[run_id] = state
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            batch.problems.append(f"{len(pending)} of {len(batch.run_ids)} runs did not finish "
                                  f"within {timeout:.0f} s (first pending: {run_id}, {state})")
            break
        await asyncio.sleep(poll)
    if not pending:
        batch.finished = time.perf_counter()
    if load:
        await load_results(client, batch)
    return batch


async def run_closed_loop(client: Any, shapes: Sequence[Shape], prefix: str, in_flight: int,
                          timeout: float, poll: float = 0.1) -> RunBatch:
    """Start the runs keeping at most ``in_flight`` of them unfinished (0: all at once), and
    wait for all. The oldest unfinished run is polled; when it rests the next one starts."""
    batch = RunBatch([], {})
    batch.started = time.perf_counter()
    deadline = time.monotonic() + timeout
    waiting = list(enumerate(shapes))
    limit = in_flight if in_flight > 0 else len(shapes)
    pending: list[str] = []

    async def fill() -> None:
        while waiting and len(pending) < limit:
            index, shape = waiting.pop(0)
            pending.append(await _start(client, batch, shape, f"{prefix}-{index}-{shape.name}"))

    await fill()
    while pending:
        run_id = pending[0]
        state = ((await client.get_run_status(run_id)) or {}).get("status")
        if state in RESTING:
            batch.statuses[run_id] = state
            pending.pop(0)
            await fill()
            continue
        if time.monotonic() > deadline:
            batch.problems.append(f"{len(pending) + len(waiting)} of {len(shapes)} runs did not "
                                  f"finish within {timeout:.0f} s (first pending: {run_id}, "
                                  f"{state})")
            break
        await asyncio.sleep(poll)
    if not pending:
        batch.finished = time.perf_counter()
    return batch


async def load_results(client: Any, batch: RunBatch) -> None:
    """Load every rested run's context; count outputs and check them against the shape."""
    for run_id in batch.run_ids:
        if run_id not in batch.statuses:
            continue
        result = await client.wait_for_result(run_id, timeout=10)
        nodes = sum(1 for key in result.context if key.startswith("_outputs."))
        batch.executed += nodes
        if nodes != batch.expected_nodes[run_id]:
            batch.problems.append(f"{run_id}: {nodes} outputs, expected "
                                  f"{batch.expected_nodes[run_id]}")
        if result.status != "completed":
            why = result.errors[0].message if result.errors else ""
            batch.problems.append(f"{run_id}: {result.status} {why}".strip())


class Budget:
    """The whole benchmark's time limit: each case gets at most what is left of it."""

    def __init__(self, seconds: float, case_timeout: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.case_timeout = case_timeout

    def timeout(self, reserve: float = 15.0) -> float | None:
        """The time limit for the next case, or None when it no longer fits (``reserve``:
        start-up and shutdown around the wait)."""
        left = self.deadline - time.monotonic() - reserve
        return None if left < 10 else min(self.case_timeout, left)


# -- output -----------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                indent: str = "  ") -> None:
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    header = line(headers)
    print(header)
    print(indent + "-" * (len(header) - len(indent)))
    for row in body:
        print(line(row))


def verdict(label: str, state: str, text: str) -> None:
    print(f"  [{state:4}] {label}: {text}")


def per_node(count: float, nodes: int) -> str:
    return f"{count / nodes:.2f}" if nodes else "-"


def vs_reference(calls_per_node: float | None) -> str:
    if not calls_per_node:
        return "-"
    return f"{REFERENCE_CALLS_PER_NODE / calls_per_node:.1f}x fewer"


def breakdown(calls: Mapping[str, int], nodes: int, limit: int = 12) -> str:
    items = sorted(((k, v) for k, v in calls.items() if v), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{k} {v} ({v / nodes:.2f}/node)" if nodes else f"{k} {v}"
                     for k, v in items[:limit]) or "none"


def print_header(title: str) -> None:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        fc = version("flowcraft-py")
    except PackageNotFoundError:
        fc = "?"
    print(f"{title}\nflowcraft (python) {fc} on Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; {platform.machine()}; {load_average()}", flush=True)


def load_average() -> str:
    """The machine's load: other processes compete with the local servers for the CPUs."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


def subtract(after: Mapping[str, int], before: Mapping[str, int]) -> Counter[str]:
    return Counter({k: after.get(k, 0) - before.get(k, 0) for k in after
                    if after.get(k, 0) - before.get(k, 0)})
