"""Distributed runs on one local moto server: flowcraft workers against Celery.

    .venv/bin/python bench/scale.py                  # everything (about 20 minutes)
    .venv/bin/python bench/scale.py --quick          # chain-50, fan-20, fan-100 once (2-3 min)
    .venv/bin/python bench/scale.py --shapes fan-100 --workers 1,3 --repeat 3 --json out.json

One moto server (SQS + DynamoDB) runs in this process (``flowcraft.local.moto_server``).
Each case gets its own queue and tables (deleted afterwards), starts its worker
processes, starts ceil(``--case-nodes`` / nodes per run) runs of one shape at once, waits
for all of them, then stops the workers. Systems:

* ``flowcraft``: ``python -m flowcraft worker aws`` processes (``--concurrency`` jobs at
  once each, default 8), loading the ``step`` node of ``bench/_shared.py``; this process
  starts the runs with the AWS adapter and polls their status.
* ``celery``: Celery 5 (``bench/celery-requirements.txt``, installed into
  ``bench/.venv-celery``, which this script creates on first use) with the SQS broker and
  the DynamoDB result backend, solo pool (one task at a time per process), tasks and
  settings in ``bench/_celery_app.py``. A chain is a Celery ``chain``; a fan is
  ``chain(step, chord(group(step x N), sink))``. A driver process in that environment sends
  the runs and polls the last task's result.
* ``reference``: the TypeScript library's SQS adapter (``@flowcraft/sqs-adapter``) is not
  on the npm registry reachable here (``npm view`` answers 404; only the core package
  ``flowcraft`` is), and it needs a coordination store (Redis) besides SQS and DynamoDB;
  its columns are printed as n/a.

Shapes: ``chain-N`` (N nodes in a line) and ``fan-N`` (one source, N branches, an ``all``
join sink: N + 2 nodes). Tasks are trivial (input + 1; the sink sums).

What is printed, per system x shape x worker processes (median of ``--repeat``):

* nodes/s: executed nodes / seconds from the first run's start to the last run seen
  completed (status polled every 0.2 s, one pending run at a time, by both drivers). A
  run counts only if its result is exact (Celery: the last task's value; flowcraft: one
  output per node).
* requests per node: every HTTP request the worker processes sent to moto while the case
  ran (start-up, idle long polls and shutdown included), from moto's request recorder;
  workers are told from the drivers by the ``app/...`` id in the User-Agent
  (``AWS_SDK_UA_APP_ID``), and Celery's long polls, which it sends with pycurl
  (User-Agent ``pycurl``), count as the workers'. Drivers' requests are listed apart.
* bytes billed per node: for every DynamoDB write (PutItem, UpdateItem, DeleteItem, each
  part of TransactWriteItems and BatchWriteItem) by anyone (workers and driver), the
  larger of the item's size before and after the write, summed over the case and
  divided by the executed nodes. The sizes are measured inside moto: see
  ``bench/_billing.py`` (wrapped ``DynamoDBBackend.put_item/update_item/delete_item``;
  DynamoDB's item-size rules applied to moto's stored item). Transactions are billed at
  this size, not at DynamoDB's double rate for transactional writes. The details also
  print the largest item any write of the case saw (an item's size before or after the
  write, whichever is larger), to check the 16 KB ceiling of a run's items. ``--no-bytes``
  leaves moto unwrapped, to check that measuring does not slow it down.
* CPU seconds per case, of this process (moto, and flowcraft's driver) and of the child
  processes (workers, and Celery's driver): steadier than wall-clock on a shared machine.

Case time limit ``--timeout`` (a timed-out case shows ``TIMEOUT`` with the nodes done so far,
read from moto's tables, and its bytes/requests per node over those nodes: a lower bound
for bytes per node, which grows as a run's item grows). ``--budget`` caps the whole
benchmark; cases that no longer fit are skipped. Shapes over 500 nodes run
``--repeat-large`` times (default 1) with the time limit ``--timeout-large`` (150 s),
because one such case can use its whole time limit.

Numbers are for moto, not AWS: moto answers every DynamoDB request under one lock,
deep-copies an item on each UpdateItem and scans a queue per message, and it shares
2 CPUs with the workers, the drivers and whatever else runs on the machine. Systems are
interleaved within each repetition (the order rotates per repetition).

This is a benchmark, not a test: it prints PASS/MISS per target and always exits 0
(unless moto cannot start; a Celery that cannot be installed is left out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _billing import (
    WriteMeter,
    celery_success,
    count_items,
    flowcraft_outputs,
)
from _shared import (
    BENCH_DIR,
    Budget,
    Shape,
    WorkerProcess,
    chain,
    fan,
    load_average,
    parse_ints,
    print_header,
    print_table,
    runtime_options,
    start_runs,
    start_workers,
    stop_workers,
    tail,
    verdict,
    wait_runs,
    worker_environment,
    write_blueprints,
)
from aws_calls import (
    CLIENT_APP,
    WORKER_APP,
    Recorder,
    classify,
    provision,
    serialize_moto_recorder,
)

SYSTEMS = ("flowcraft", "celery", "reference")
SHORT = {"flowcraft": "fc", "celery": "celery", "reference": "ref"}
DEFAULT_SHAPES = "chain-50,fan-20,fan-100,fan-1000"
QUICK_SHAPES = "chain-50,fan-20,fan-100"
LARGE = 500  # nodes: shapes above run --repeat-large times
CELERY_VENV = BENCH_DIR / ".venv-celery"
CELERY_REQUIREMENTS = BENCH_DIR / "celery-requirements.txt"
CELERY_READY = "bench celery worker ready"  # _celery_app.READY_LINE
REFERENCE_NA = ("not run: @flowcraft/sqs-adapter is not on the npm registry (404), and the "
                "adapter needs a Redis coordination store")
STOP_GRACE = 4.0  # seconds a stopped worker may take before it is killed


def parse_shapes(text: str) -> list[Shape]:
    """``chain-50,fan-20,...``."""
    shapes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, _, size = part.partition("-")
        if kind not in ("chain", "fan") or not size.isdigit() or int(size) < 1:
            raise ValueError(f"unknown shape {part!r} (chain-N or fan-N, e.g. fan-100)")
        shapes.append(chain(int(size)) if kind == "chain" else fan(int(size)))
    return shapes


def runs_for(shape: Shape, case_nodes: int) -> int:
    return max(1, math.ceil(case_nodes / shape.nodes))


def who(entry: dict[str, Any]) -> tuple[str, str]:
    """(worker | client | other, ``service.Operation``): kombu's async SQS calls (long polls)
    go out through pycurl without the SDK's User-Agent; only Celery workers receive."""
    party, operation = classify(entry)
    if party == "other":
        headers = {k.lower(): v for k, v in (entry.get("headers") or {}).items()}
        if "pycurl" in str(headers.get("user-agent", "")):
            party = "worker"
    return party, operation


def agent_party(agent: str) -> str:
    if f"app/{WORKER_APP}" in agent or "pycurl" in agent:
        return "worker"
    return "client" if f"app/{CLIENT_APP}" in agent else "other"


# -- one case ------------------------------------------------------------------------------------


@dataclass
class Case:
    system: str
    shape: str
    workers: int
    runs: int
    repetition: int
    expected: int = 0
    nodes: int = 0  # executed nodes (done so far, if it timed out)
    seconds: float | None = None
    timed_out: bool = False
    requests: dict[str, Counter[str]] = field(default_factory=dict)  # party -> operation
    write_bytes: Counter[str] = field(default_factory=Counter)  # "party op" -> bytes
    writes: Counter[str] = field(default_factory=Counter)
    largest_item: int = 0  # bytes: the largest item any write of the case saw
    server_cpu: float = 0.0  # this process: moto (and flowcraft's driver)
    workers_cpu: float = 0.0  # child processes: workers (and Celery's driver)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.seconds is not None and not self.problems and self.nodes == self.expected

    def rate(self) -> float | None:
        return self.nodes / self.seconds if self.ok and self.seconds else None

    def worker_requests(self) -> int:
        return sum(self.requests.get("worker", Counter()).values())

    def per_node(self, value: float) -> float | None:
        return value / self.nodes if self.nodes else None


class Bench:
    def __init__(self, endpoint: Any, recorder: Recorder, meter: WriteMeter, scratch: Path,
                 blueprint_dir: Path, concurrency: int) -> None:
        self.endpoint = endpoint
        self.recorder = recorder
        self.meter = meter
        self.scratch = scratch
        self.blueprint_dir = blueprint_dir
        self.concurrency = concurrency

    def run(self, system: str, shape: Shape, workers: int, runs: int, repetition: int,
            timeout: float) -> Case:
        case = Case(system, shape.name, workers, runs, repetition, expected=runs * shape.nodes)
        work = self.flowcraft if system == "flowcraft" else self.celery
        try:
            names = work(case, shape, timeout, prepare=True)
        except Exception as exc:
            case.problems.append(f"provisioning: {type(exc).__name__}: {exc}")
            return case
        self.meter.reset()
        self.recorder.start()
        cpu, children = time.process_time(), children_cpu()
        try:
            work(case, shape, timeout, names=names)
        finally:
            case.server_cpu = time.process_time() - cpu
            case.workers_cpu = children_cpu() - children
            entries = self.recorder.stop()
            case.write_bytes, case.writes = self.meter.snapshot()
            case.largest_item = self.meter.largest
            if system == "flowcraft":
                queues, tables = [names.queue_name], [names.context_table, names.status_table,
                                                      names.coordination_table]
            else:
                queues, tables = [names[0]], [names[1]]
            asyncio.run(remove(self.endpoint.url, queues, tables))
        for entry in entries:
            party, operation = who(entry)
            case.requests.setdefault(party, Counter())[operation] += 1
        return case

    # flowcraft ------------------------------------------------------------------------------

    def flowcraft(self, case: Case, shape: Shape, timeout: float, prepare: bool = False,
                  names: Any = None) -> Any:
        if prepare:
            return asyncio.run(provision(self.endpoint.url))
        from flowcraft.adapters.connect import aws_adapter

        env = worker_environment({**names.environment(), "AWS_SDK_UA_APP_ID": WORKER_APP})
        processes: list[WorkerProcess] = []
        try:
            processes = start_workers("aws", case.workers, self.blueprint_dir, self.scratch, env,
                                      self.concurrency, tag=f"{shape.name}-{case.workers}-")

            async def drive() -> None:
                async with aws_adapter(names.settings(self.endpoint.url),
                                       runtime_options([shape])) as client:
                    batch = await start_runs(client, [shape] * case.runs,
                                             f"scale-{uuid.uuid4().hex[:6]}")
                    await wait_runs(client, batch, timeout)
                    case.nodes = batch.executed
                    case.seconds = batch.seconds
                    case.problems += batch.problems
                    case.timed_out = batch.finished is None

            asyncio.run(drive())
        except Exception as exc:
            case.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            stop_workers(processes, timeout=STOP_GRACE)
        if case.timed_out:
            case.nodes = count_items(names.context_table, flowcraft_outputs)
        return None

    # celery ---------------------------------------------------------------------------------

    def celery(self, case: Case, shape: Shape, timeout: float, prepare: bool = False,
               names: Any = None) -> Any:
        if prepare:
            return asyncio.run(provision_celery(self.endpoint.url))
        queue, table = names
        base = {**os.environ, "BENCH_MOTO_HOST": "127.0.0.1",
                "BENCH_MOTO_PORT": str(self.endpoint.port), "BENCH_CELERY_QUEUE": queue,
                "BENCH_CELERY_TABLE": table, "C_FORCE_ROOT": "1"}
        processes: list[WorkerProcess] = []
        try:
            processes = start_celery_workers(case.workers, {**base,
                                             "AWS_SDK_UA_APP_ID": WORKER_APP},
                                             self.scratch, f"{shape.name}-{case.workers}")
            done = subprocess.run(
                [str(venv_python()), "_celery_app.py", "drive", shape.name, str(case.runs),
                 str(timeout)], cwd=str(BENCH_DIR), capture_output=True, text=True,
                env={**base, "AWS_SDK_UA_APP_ID": CLIENT_APP}, timeout=timeout + 120)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise RuntimeError(f"celery driver printed nothing: {tail(done.stderr)}")
            report = json.loads(lines[-1])
            case.nodes = int(report["nodes"])
            case.seconds = report["seconds"]
            case.problems += report["problems"]
            case.timed_out = any("did not finish" in p for p in report["problems"])
        except Exception as exc:
            case.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            stop_workers(processes, timeout=STOP_GRACE)
        if case.timed_out:
            case.nodes = count_items(table, celery_success)
        return None


async def provision_celery(endpoint: str) -> tuple[str, str]:
    from flowcraft.adapters.connect import AwsSettings, aws_clients

    suffix = uuid.uuid4().hex[:8]
    queue, table = f"bench-celery-{suffix}", f"bench-celery-results-{suffix}"
    async with aws_clients(AwsSettings.resolve(endpoint_url=endpoint)) as (sqs, dynamodb):
        await sqs.create_queue(QueueName=queue)
        await dynamodb.create_table(
            TableName=table, BillingMode="PAY_PER_REQUEST",
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}])
    return queue, table


async def remove(endpoint: str, queues: list[str], tables: list[str]) -> None:
    """Delete a finished case's queue and tables: later cases get a moto as empty as the
    first one had."""
    from flowcraft.adapters.connect import AwsSettings, aws_clients

    async with aws_clients(AwsSettings.resolve(endpoint_url=endpoint)) as (sqs, dynamodb):
        for queue in queues:
            with contextlib.suppress(Exception):
                url = (await sqs.get_queue_url(QueueName=queue))["QueueUrl"]
                await sqs.delete_queue(QueueUrl=url)
        for table in tables:
            with contextlib.suppress(Exception):
                await dynamodb.delete_table(TableName=table)


def start_celery_workers(count: int, env: dict[str, str], log_dir: Path, tag: str,
                         ready_timeout: float = 60.0) -> list[WorkerProcess]:
    suffix = uuid.uuid4().hex[:6]
    workers = []
    for index in range(count):
        command = [str(CELERY_VENV / "bin" / "celery"), "-A", "_celery_app", "worker",
                   "-P", "solo", "-c", "1", "-Q", env["BENCH_CELERY_QUEUE"],
                   "--without-gossip", "--without-mingle", "--without-heartbeat",
                   "-l", "warning", "-n", f"w{index}-{suffix}@bench"]
        log_path = log_dir / f"worker-celery-{tag}-{index}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the child process
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=str(BENCH_DIR))
        log.close()
        workers.append(WorkerProcess(process, log_path))
    deadline = time.monotonic() + ready_timeout
    for worker in workers:
        while CELERY_READY not in worker.log():
            if worker.process.poll() is not None or time.monotonic() > deadline:
                stop_workers(workers, timeout=STOP_GRACE)
                raise RuntimeError(f"celery worker did not start (exit "
                                   f"{worker.process.poll()}): {tail(worker.log())}")
            time.sleep(0.05)
    return workers


def children_cpu() -> float:
    """CPU seconds of the reaped child processes (the workers, the Celery driver)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the Celery environment ----------------------------------------------------------------------


def venv_python() -> Path:
    return CELERY_VENV / "bin" / "python"


def ensure_celery_venv() -> str:
    """Create ``bench/.venv-celery`` from ``bench/celery-requirements.txt`` unless it is there
    and was installed from the same file. Returns the installed Celery version."""
    marker = CELERY_VENV / ".requirements"
    wanted = CELERY_REQUIREMENTS.read_text(encoding="utf-8")
    if not (venv_python().exists() and marker.exists()
            and marker.read_text(encoding="utf-8") == wanted):
        print(f"installing Celery into {CELERY_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CELERY_VENV)], check=True)
        done = subprocess.run([str(venv_python()), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", "-r", str(CELERY_REQUIREMENTS)],
                              capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"pip install -r {CELERY_REQUIREMENTS.name} failed: "
                          f"{tail(done.stderr + done.stdout, 8)}")
        marker.write_text(wanted, encoding="utf-8")
    done = subprocess.run([str(venv_python()), "-c", "import celery, kombu; "
                           "print(celery.__version__, kombu.__version__)"],
                          capture_output=True, text=True, check=True)
    celery_version, kombu_version = done.stdout.split()
    return f"Celery {celery_version}, kombu {kombu_version}"


# -- report --------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Cell:
    """The median of one system x shape x workers over its repetitions."""

    cases: list[Case]

    def done(self) -> list[Case]:
        return [c for c in self.cases if c.ok]

    def rate(self) -> float | None:
        return median([r for c in self.done() if (r := c.rate()) is not None])

    def _per_node(self, value: Any) -> tuple[float | None, bool]:
        """(median over complete cases, or over partial ones if none completed; partial?)"""
        pool = self.done() or [c for c in self.cases if c.nodes]
        values = [v for c in pool if (v := c.per_node(value(c))) is not None]
        return median(values), not self.done()

    def requests(self) -> tuple[float | None, bool]:
        return self._per_node(lambda c: c.worker_requests())

    def bytes(self) -> tuple[float | None, bool]:
        return self._per_node(lambda c: sum(c.write_bytes.values()))

    def status(self) -> str:
        if not self.cases:
            return "skipped"
        ok = len(self.done())
        if ok == len(self.cases):
            return f"{ok}/{ok} ok"
        bad = next(c for c in self.cases if not c.ok)
        why = (f"TIMEOUT {bad.nodes}/{bad.expected} nodes" if bad.timed_out
               else "FAIL " + "; ".join(bad.problems[:1])[:60])
        return f"{ok}/{len(self.cases)} ok; {why}"


def fmt(value: float | None, digits: int = 1, partial: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:,.{digits}f}"
    return f"{text}*" if partial else text


def print_report(cells: dict[tuple[str, str, int], Cell], shapes: list[Shape],
                 worker_counts: list[int], systems: list[str]) -> None:
    ran = [s for s in systems if s != "reference"]
    print("\nMedian per system x shape x worker processes (fc: flowcraft, ref: reference; "
          "*: from a timed-out case,\n  over the nodes it got done: for bytes a lower "
          "bound)")
    headers = ["shape", "workers"]
    for label in ("nodes/s", "reqs/node", "bytes/node"):
        headers += [f"{label} {SHORT[s]}" for s in systems]
    if "flowcraft" in ran and "celery" in ran:
        headers.append("fc/celery")
    rows = []
    for shape in shapes:
        for workers in worker_counts:
            row: list[str] = [shape.name, str(workers)]
            row += ["n/a" if s == "reference" else (
                fmt(cells[s, shape.name, workers].rate()) if (s, shape.name, workers) in cells
                else "-") for s in systems]
            for metric, digits in (("requests", 2), ("bytes", 0)):
                for s in systems:
                    if s == "reference":
                        row.append("n/a")
                        continue
                    cell = cells.get((s, shape.name, workers))
                    value, partial = getattr(cell, metric)() if cell else (None, False)
                    row.append(fmt(value, digits, partial))
            if len(headers) > len(row):
                fc = cells.get(("flowcraft", shape.name, workers))
                ce = cells.get(("celery", shape.name, workers))
                a, b = (fc.rate() if fc else None), (ce.rate() if ce else None)
                row.append(f"{a / b:.2f}x" if a and b else "-")
            rows.append(row)
    print_table(headers, rows)
    print("  nodes/s: executed nodes / seconds from the first start to the last completion; "
          "reqs/node: the worker\n  processes' requests to moto (recorder); bytes/node: "
          "DynamoDB write bytes billed (max of item size\n  before/after each write, workers "
          "and driver) / executed nodes. "
          + ("reference: " + REFERENCE_NA + "." if "reference" in systems else ""))
    print("\nCases (median seconds; status over the repetitions)")
    rows = []
    for (system, shape_name, workers), cell in cells.items():
        seconds = median([c.seconds for c in cell.done() if c.seconds])
        server = median([c.server_cpu for c in cell.cases])
        workers_cpu = median([c.workers_cpu for c in cell.cases])
        rows.append([system, shape_name, workers, cell.cases[0].runs if cell.cases else "-",
                     cell.cases[0].expected if cell.cases else "-", fmt(seconds, 2),
                     fmt(server, 1), fmt(workers_cpu, 1), cell.status()])
    print_table(["system", "shape", "workers", "runs", "nodes", "seconds", "moto CPU s",
                 "workers CPU s", "status"], rows)
    print("  CPU over the whole case (start-up and shutdown of the workers included): moto "
          "CPU is this process\n  (moto, and flowcraft's driver); workers CPU is the worker "
          "processes (and Celery's driver).")
    print("\nWhere the requests and bytes go (1 worker; first repetition; per executed node)")
    for (system, shape_name, workers), cell in cells.items():
        if workers != min(worker_counts) or not cell.cases or not cell.cases[0].nodes:
            continue
        case = cell.cases[0]
        n = case.nodes
        worker = case.requests.get("worker", Counter())
        top = ", ".join(f"{k} {v / n:.2f}" for k, v in worker.most_common(6))
        client = sum(case.requests.get("client", Counter()).values())
        written = ", ".join(f"{k} {v / n:,.0f} B ({case.writes[k]} writes)"
                            for k, v in case.write_bytes.most_common(4))
        print(f"  {system} {shape_name}: worker requests: {top or 'none'}; driver requests "
              f"{client / n:.2f}/node\n    bytes: {written or 'none'}; largest item written "
              f"{case.largest_item:,} B")


def print_targets(cells: dict[tuple[str, str, int], Cell], worker_counts: list[int]) -> None:
    print("\nTargets")

    def rate(system: str, shape: str, workers: int) -> float | None:
        cell = cells.get((system, shape, workers))
        return cell.rate() if cell else None

    for shape in ("fan-100", "chain-50"):
        for workers in worker_counts:
            label = f"flowcraft {shape} >= 1.5x Celery nodes/s ({workers} worker(s))"
            a, b = rate("flowcraft", shape, workers), rate("celery", shape, workers)
            if a is None or b is None:
                verdict(label, "N/A", "not measured or did not complete")
            else:
                verdict(label, "PASS" if a >= 1.5 * b else "MISS",
                        f"{a:,.1f} vs {b:,.1f} nodes/s = {a / b:.2f}x")

    def bytes_per_node(shape: str) -> tuple[float | None, bool]:
        values: list[float] = []
        partial = False
        for workers in worker_counts:
            cell = cells.get(("flowcraft", shape, workers))
            if cell:
                value, part = cell.bytes()
                if value is not None:
                    values.append(value)
                    partial = partial or part
        return median(values), partial

    label = "flowcraft bytes billed per node at fan-1000 <= 2x fan-20"
    big, partial = bytes_per_node("fan-1000")
    small, _ = bytes_per_node("fan-20")
    if big is None or small is None:
        verdict(label, "N/A", "not measured")
    elif partial and big <= 2 * small:
        verdict(label, "N/A", f"fan-1000 did not complete: {big:,.0f} B/node so far (a lower "
                f"bound) vs {small:,.0f} B/node")
    else:
        verdict(label, "PASS" if big <= 2 * small else "MISS",
                f"{'>=' if partial else ''}{big:,.0f} vs {small:,.0f} B/node = "
                f"{'>=' if partial else ''}{big / small:.1f}x"
                + (" (fan-1000 timed out: a lower bound)" if partial else ""))
    label = "flowcraft 3 workers faster than 1 on fan-100"
    one, three = rate("flowcraft", "fan-100", 1), rate("flowcraft", "fan-100", 3)
    if one is None or three is None:
        verdict(label, "N/A", "not measured (needs --workers 1,3 and fan-100)")
    else:
        verdict(label, "PASS" if three > one else "MISS",
                f"{three:,.1f} vs {one:,.1f} nodes/s = {three / one:.2f}x")


def case_json(case: Case) -> dict[str, Any]:
    """A case as JSON (``asdict`` would turn the Counters into counts of their items)."""
    data = {f.name: getattr(case, f.name) for f in fields(case)}
    data["requests"] = {party: dict(ops) for party, ops in case.requests.items()}
    data["write_bytes"], data["writes"] = dict(case.write_bytes), dict(case.writes)
    data["largest_item"] = case.largest_item
    return data


# -- main ----------------------------------------------------------------------------------------


def schedule(shapes: list[Shape], worker_counts: list[int], systems: list[str], repeat: int,
             repeat_large: int) -> list[tuple[int, Shape, int, str]]:
    """(repetition, shape, workers, system): systems interleaved, their order rotating."""
    order = []
    for repetition in range(repeat):
        turn = systems[repetition % len(systems):] + systems[:repetition % len(systems)]
        for shape in shapes:
            if shape.nodes > LARGE and repetition >= repeat_large:
                continue
            for workers in worker_counts:
                order += [(repetition, shape, workers, system) for system in turn]
    return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help="chain-N / fan-N, comma-separated (default %(default)s)")
    parser.add_argument("--workers", default="1,3",
                        help="worker process counts (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repetitions; medians are printed (default %(default)s)")
    parser.add_argument("--repeat-large", type=int, default=1,
                        help=f"repetitions of shapes over {LARGE} nodes (default %(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="any of flowcraft, celery, reference (default %(default)s)")
    parser.add_argument("--case-nodes", type=int, default=150,
                        help="runs per case = ceil(this / nodes per run), all started at "
                             "once (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="jobs at once per flowcraft worker process (default %(default)s; "
                             "Celery's solo pool runs one)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds one case may wait for its runs (default %(default)s)")
    parser.add_argument("--timeout-large", type=float, default=150.0,
                        help=f"the time limit of shapes over {LARGE} nodes "
                             "(default %(default)s)")
    parser.add_argument("--budget", type=float, default=1200.0,
                        help="seconds for all cases: later cases that no longer fit are "
                             "skipped (default %(default)s)")
    parser.add_argument("--no-bytes", action="store_true",
                        help="do not measure bytes billed (to see what measuring them costs "
                             "moto, which runs in this process)")
    parser.add_argument("--quick", action="store_true",
                        help=f"--shapes {QUICK_SHAPES} --repeat 1 --case-nodes 100")
    parser.add_argument("--json", metavar="PATH", help="also write every case as JSON here")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep worker logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.repeat, args.case_nodes = QUICK_SHAPES, 1, 100
    try:
        shapes = parse_shapes(args.shapes)
        worker_counts = parse_ints(args.workers)
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        if unknown := set(systems) - set(SYSTEMS):
            raise ValueError(f"unknown systems {sorted(unknown)} (choose from {SYSTEMS})")
    except ValueError as exc:
        parser.error(str(exc))
    print_header("Distributed runs on one local moto server: flowcraft workers vs Celery")
    versions = "Celery not run"
    if "celery" in systems:
        try:
            versions = ensure_celery_venv()
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            print(f"cannot install Celery into {CELERY_VENV}, so it is left out: {exc}")
            systems.remove("celery")
    if "reference" in systems:
        print(f"reference: {REFERENCE_NA}")
    running = [s for s in systems if s != "reference"]
    order = schedule(shapes, worker_counts, running, args.repeat, args.repeat_large)
    cells: dict[tuple[str, str, int], Cell] = {
        (system, shape.name, workers): Cell([]) for shape in shapes
        for workers in worker_counts for system in running}
    budget = Budget(args.budget, max(args.timeout, args.timeout_large))
    with tempfile.TemporaryDirectory(prefix="flowcraft-scale-") as scratch_text:
        scratch = Path(args.log_dir or scratch_text)
        scratch.mkdir(parents=True, exist_ok=True)
        # Before moto is imported: the recorder reads its file path once, at import.
        os.environ["MOTO_RECORDER_FILEPATH"] = str(scratch / "moto-recording.jsonl")
        os.environ["AWS_SDK_UA_APP_ID"] = CLIENT_APP
        from flowcraft.local import moto_server

        blueprint_dir = scratch / "blueprints"
        write_blueprints(blueprint_dir, shapes)
        serialize_moto_recorder()
        meter = WriteMeter(agent_party)
        if not args.no_bytes:
            meter.install()  # before moto_server() puts its DynamoDB lock around it
        try:
            server = moto_server()
            endpoint = server.__enter__()
        except Exception as exc:
            print(f"cannot start moto: {exc}")
            return 1
        try:
            os.environ.update(endpoint.environment())
            print(f"moto server {endpoint.url} (in this process); {versions}; "
                  f"{len(order)} cases; time limit {args.timeout:g} s per case "
                  f"({args.timeout_large:g} s over {LARGE} nodes), "
                  f"{args.budget:g} s in all\n", flush=True)
            bench = Bench(endpoint, Recorder(endpoint.url), meter, scratch, blueprint_dir,
                          args.concurrency)
            for repetition, shape, workers, system in order:
                limit = budget.timeout(reserve=25.0)
                if limit is not None:
                    limit = min(limit, args.timeout_large if shape.nodes > LARGE
                                else args.timeout)
                label = f"  [{repetition + 1}] {system:9} {shape.name:9} x{workers}"
                if limit is None or limit < min(args.timeout, 60.0):
                    print(f"{label}: skipped (not enough of --budget left)", flush=True)
                    continue
                print(f"{label} ...", end=" ", flush=True)
                started = time.perf_counter()
                case = bench.run(system, shape, workers, runs_for(shape, args.case_nodes),
                                 repetition, limit)
                cells[system, shape.name, workers].cases.append(case)
                rate = case.rate()
                state = (f"{case.nodes} nodes in {case.seconds:.2f} s = {rate:,.1f} nodes/s"
                         if rate else ("TIMEOUT: " if case.timed_out else "FAIL: ")
                         + f"{case.nodes}/{case.expected} nodes; "
                         + "; ".join(case.problems[:2]))
                print(f"{state} ({time.perf_counter() - started:.0f} s)", flush=True)
        finally:
            server.__exit__(None, None, None)
            meter.uninstall()
    print_report(cells, shapes, worker_counts, systems)
    print(f"\nat the end: {load_average()}")
    print_targets(cells, worker_counts)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"versions": versions, "reference": REFERENCE_NA,
             "cases": [case_json(c) for cell in cells.values() for c in cell.cases]},
            indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
