"""Crash tests: worker processes killed with SIGKILL while 30 runs are in flight.

One test per backend (AWS on moto, Azure on Azurite + the Cosmos DB server + Redis),
sharing one harness:

* 3 worker processes (``python -m flowcraft worker <backend>``, ``--lease-seconds 3``)
  on one queue, and a reconciler process (``python -m flowcraft reconcile <backend>
  --every 2 --stalled-threshold 20``; why 20: see ``STALLED_THRESHOLD``). The reconciler
  gets ``--registry`` too: the CLI calls it optional, but without it every reconciliation
  fails ("no implementation registered for uses ...": ``reconcile`` builds the graph
  through the registry check);
* 30 runs of a 20-node fan-out / fan-in (``source`` -> ``p01`` .. ``p18`` -> ``sink``,
  ``tests/crash_blueprints/crash-fanout.json``), started a little apart so that the
  kills are spread over the whole load; every node sleeps 20-100 ms;
* every 2-3.5 s one worker, chosen at random, is killed with SIGKILL (mid-node, most of
  the time: the workers are busy) and a new one is started in its place — 25 kills at
  most.

What must hold (``tests/crash_nodes.py`` logs every node execution's start and end to a
shared file, and the test logs ``KILL <pid>`` there once a killed worker is reaped):

* every run completes;
* the log accounts for every re-execution: an execution of a node is followed by another
  one only if its worker was killed before the next one started (a node that a kill
  interrupted runs again; no other node does — in particular no node whose execution
  ended and committed runs again), and the committed writes of each node are those of its
  last execution (``executedBy.<node>``);
* every run's committed context has exactly one ``_outputs.<node>`` per node, and equals
  the context the in-memory ``FlowRuntime`` computes for the same blueprint, input and run
  id (``blueprintVersion`` and ``executedBy.*`` left out).

Every process started here is killed in the fixture's teardown, whatever happens.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import crash_nodes
from flowcraft import FlowRuntime
from flowcraft.blueprint import load_blueprints
from flowcraft.context import public_view
from flowcraft.distributed.adapter import RESTING_STATUSES, BaseDistributedAdapter
from flowcraft.distributed.context import LOCK_PREFIX

TESTS_DIR = Path(__file__).resolve().parent
BLUEPRINTS_DIR = TESTS_DIR / "crash_blueprints"
BLUEPRINT_ID = "crash-fanout"

RUNS = 30
WORKERS = 3
LEASE_SECONDS = 3
"""Node lease and message visibility of the workers (renewed every second while a node
runs): a killed worker's nodes are taken over about 3 s after the kill."""
START_EVERY = 0.5
"""Seconds between run starts: the 30 runs are started over ~15 s, so the kills land
throughout the load instead of only on its first seconds."""
KILL_EVERY = (2.0, 3.5)
"""Seconds between kills (uniformly random in this range, seeded)."""
MAX_KILLS = 25
"""Kills stop after this many (about 70 s of killing, which on an idle machine covers the
whole load) or once every run has completed. The cap keeps the test bounded when the
machine is slow: each restart costs a second of CPU and each kill hides the victim's
messages for a lease, so on a loaded machine endless kills could outpace the recovery."""

# The reconciler. A run is "stalled" when its `lastUpdated` is older than the threshold;
# workers write `lastUpdated` at most once per `status_touch_seconds` per run (15 s by
# default; `flowcraft worker` has no flag for it), so the threshold must exceed 15 s, as the
# adapter's docstring says, or healthy runs count as stalled. That is not only wasteful:
# with a 3 s threshold we saw a feedback loop here — reconcile re-enqueues every ready,
# unleased node, i.e. each of a healthy run's 17 branch jobs still waiting in the backlog;
# the duplicates deepen the backlog, so more runs look stalled at the next pass, and 19 of
# 30 runs had not finished after 150 s. With 20 s, healthy runs are mostly left alone, and a run
# whose frontier a kill really lost (e.g. a kill between a commit and the enqueue of its
# successors, when the node claimed for local continuation is still leased by the dead
# worker as the redelivered job re-announces it) is resumed within 20 + 2 s.
RECONCILE_EVERY = 2
STALLED_THRESHOLD = 20

RUNS_DEADLINE = 240.0
"""Seconds after the last start within which every run must have completed. On an idle
2-core machine they complete ~50 s after it (AWS); the margin is for a loaded machine."""
QUIET_AFTER = LEASE_SECONDS + 1.0
"""After the last run completed, keep the workers a little longer: a late re-execution
(a lease expiring, a duplicate job) would show up in the log."""

NODE_IDS = ["source", *(f"p{k:02d}" for k in range(1, 19)), "sink"]


# -- processes -----------------------------------------------------------------------------


class Processes:
    """Every subprocess of a test; ``kill_all`` (the fixture's teardown) kills what is left."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as output:
            process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=dict(env),
                                       cwd=self.log_dir, start_new_session=True)
        self.started.append(process)
        return process

    @staticmethod
    def kill(process: subprocess.Popen[bytes]) -> None:
        """SIGKILL (no chance to release anything) and reap."""
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def kill_all(self) -> None:
        for process in self.started:
            try:
                self.kill(process)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@pytest.fixture
def atomic_moto_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the session's moto server handle one DynamoDB request at a time.

    moto serves every request on a thread of its own and its DynamoDB backend has no lock:
    a conditional ``UpdateItem`` checks its condition and applies its update with other
    requests interleaved, so two claims of one node can both succeed, and serialising an
    item that another request is changing fails with HTTP 500 ("dictionary changed size
    during iteration") *after* the update was applied — botocore retries it, and the retry
    of an applied commit fails its condition. Real DynamoDB applies a conditional write
    atomically; this lock (the server runs in this process) restores that, so that what
    the test finds is the job algorithm's doing, not moto's.
    """
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    call_action = DynamoHandler.call_action

    def atomic_call_action(self: Any) -> Any:
        with lock:
            return call_action(self)

    monkeypatch.setattr(DynamoHandler, "call_action", atomic_call_action)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


# -- the execution log ---------------------------------------------------------------------


@dataclass
class Execution:
    pid: int
    name: str
    """``<pid>-<n>``: what the node records under ``executedBy.<node>``."""
    start: int
    """Line number of its ``start``."""
    end: int | None = None
    """Line number of its ``end``; ``None`` if a kill interrupted it."""


@dataclass
class ExecutionLog:
    executions: dict[tuple[str, str], list[Execution]] = field(
        default_factory=lambda: defaultdict(list))
    kills: dict[int, int] = field(default_factory=dict)
    """Killed pid -> line number of its ``KILL`` line (written after the process was reaped,
    so every line of that pid comes before it)."""
    problems: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> ExecutionLog:
        log = cls()
        lines = path.read_text().splitlines() if path.exists() else []
        for index, line in enumerate(lines):
            parts = line.split()
            if len(parts) == 2 and parts[0] == "KILL":
                log.kills[int(parts[1])] = index
                continue
            if len(parts) != 6:
                log.problems.append(f"line {index + 1} is malformed: {line!r}")
                continue
            run_id, node_id, _attempt, pid_text, name, event = parts
            runs = log.executions[(run_id, node_id)]
            if event == "start":
                runs.append(Execution(int(pid_text), name, index))
                continue
            open_ones = [e for e in runs if e.name == name and e.end is None]
            if event != "end" or not open_ones:
                log.problems.append(f"line {index + 1}: {line!r} has no matching start")
                continue
            open_ones[-1].end = index
        return log

    def open_by_pid(self) -> Counter[int]:
        """Executions that have no ``end`` (yet), by pid."""
        return Counter(e.pid for runs in self.executions.values() for e in runs
                       if e.end is None)


def append_line(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# -- the harness ---------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    """``aws`` or ``azure`` (the CLI's backend argument)."""
    client: BaseDistributedAdapter
    """An adapter in this process that is never started: it starts runs and reads them."""
    environment: dict[str, str]


@dataclass
class Kill:
    slot: int
    pid: int
    at: float
    open_nodes: int
    """Nodes the killed worker had started and not finished (by the log, at the kill)."""


class CrashHarness:
    stalled_threshold: float = STALLED_THRESHOLD
    runs_deadline: float = RUNS_DEADLINE

    def __init__(self, backend: Backend, processes: Processes, tmp_path: Path,
                 seed: int) -> None:
        self.backend = backend
        self.processes = processes
        self.tmp_path = tmp_path
        self.log_path = tmp_path / "executions.log"
        self.random = random.Random(seed)
        self.seed = seed
        python_path = os.pathsep.join(
            p for p in (str(TESTS_DIR), backend.environment.get("PYTHONPATH")) if p)
        self.env = {**backend.environment, "PYTHONPATH": python_path,
                    crash_nodes.LOG_ENVIRONMENT: str(self.log_path), "PYTHONUNBUFFERED": "1"}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.spawned = 0
        self.kills: list[Kill] = []
        self.reconciler: subprocess.Popen[bytes] | None = None

    # -- processes -------------------------------------------------------------------------

    def start_worker(self) -> subprocess.Popen[bytes]:
        self.spawned += 1
        return self.processes.spawn(f"worker-{self.spawned:02d}", [
            sys.executable, "-m", "flowcraft", "-v", "worker", self.backend.name,
            "--registry", "crash_nodes:registry", "--blueprints", str(BLUEPRINTS_DIR),
            "--lease-seconds", str(LEASE_SECONDS),
        ], self.env)

    def start_reconciler(self) -> None:
        self.reconciler = self.processes.spawn("reconciler", [
            sys.executable, "-m", "flowcraft", "-v", "reconcile", self.backend.name,
            # --registry is needed (see the module docstring).
            "--registry", "crash_nodes:registry",
            "--blueprints", str(BLUEPRINTS_DIR), "--every", str(RECONCILE_EVERY),
            "--stalled-threshold", f"{self.stalled_threshold:g}",
        ], self.env)

    def kill_one(self) -> None:
        """Kill a worker chosen at random, start a new one in its place.

        Not the busiest one: the jobs a killed worker held come back ~3 s later (the
        lease), in a burst, to one worker, which would then be the busiest at the next
        kill — the same jobs would be killed again and again until their messages pass the
        receive limit and count as poison (correctly: a job whose processing coincides with
        6 worker deaths is what the limit is for). With 3 busy workers a random victim is
        mid-node most of the time anyway (the report says how often).
        """
        open_nodes = ExecutionLog.read(self.log_path).open_by_pid()
        slot = self.random.randrange(len(self.workers))
        victim = self.workers[slot]
        self.processes.kill(victim)
        append_line(self.log_path, f"KILL {victim.pid}")
        self.kills.append(Kill(slot, victim.pid, time.monotonic(), open_nodes[victim.pid]))
        self.workers[slot] = self.start_worker()

    async def inject_faults(self, stop: asyncio.Event) -> None:
        """The faults of the scenario while runs are in flight, until ``stop`` is set:
        here, SIGKILLs (``tests/test_network_faults.py`` injects network faults instead)."""
        await self.kill_loop(stop)

    async def kill_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and len(self.kills) < MAX_KILLS:
            try:
                await asyncio.wait_for(stop.wait(), self.random.uniform(*KILL_EVERY))
            except TimeoutError:
                self.kill_one()

    def check_alive(self) -> None:
        dead = [p for p in [*self.workers, self.reconciler]
                if p is not None and p.poll() is not None]
        if dead:
            pytest.fail(f"{len(dead)} process(es) exited on their own (exit codes "
                        f"{[p.returncode for p in dead]}); see {self.tmp_path}/*.log:\n"
                        + self.log_tails())

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> None:
        backend = self.backend.name
        runtime = FlowRuntime(blueprints=load_blueprints(BLUEPRINTS_DIR),
                              registry=crash_nodes.registry)
        run_ids = [f"crash-{backend}-{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(RUNS)]
        initial = {run_id: {"n": i} for i, run_id in enumerate(run_ids)}
        assert crash_nodes.LOG_ENVIRONMENT not in os.environ  # the oracle must not log
        expected = dict(zip(run_ids, await asyncio.gather(*(
            runtime.run(BLUEPRINT_ID, initial[run_id], run_id=run_id) for run_id in run_ids
        )), strict=True))
        assert all(result.status == "completed" for result in expected.values())

        began = time.monotonic()
        self.workers = [self.start_worker() for _ in range(WORKERS)]
        self.start_reconciler()
        stop_faults = asyncio.Event()
        faults = asyncio.get_running_loop().create_task(self.inject_faults(stop_faults))
        try:
            for run_id in run_ids:
                await self.backend.client.start_workflow(BLUEPRINT_ID, initial[run_id],
                                                         run_id=run_id)
                await asyncio.sleep(START_EVERY)
            statuses = await self.wait_for_runs(run_ids)
            completed_after = time.monotonic() - began
        finally:
            stop_faults.set()
            await faults
        await asyncio.sleep(QUIET_AFTER)
        self.check_alive()
        self.processes.kill_all()

        contexts = {run_id: await self.backend.client.create_context(run_id).load() or {}
                    for run_id in run_ids}
        log = ExecutionLog.read(self.log_path)
        self.report(log, completed_after, time.monotonic() - began)
        not_completed = {r: s for r, s in statuses.items() if s != "completed"}
        if not_completed:
            failures = [await self.explain_failure(run_id, contexts[run_id])
                        for run_id in not_completed]
            pytest.fail(f"{len(not_completed)} of {RUNS} runs did not complete:\n"
                        + "\n".join(failures) + "\n" + self.describe(not_completed, contexts))
        self.check_log(log, run_ids, contexts)
        self.check_contexts(run_ids, contexts, expected)

    async def wait_for_runs(self, run_ids: list[str]) -> dict[str, str | None]:
        """Poll the status records until every run rests; fail (with diagnostics) after
        ``RUNS_DEADLINE`` seconds."""
        statuses: dict[str, str | None] = dict.fromkeys(run_ids)
        deadline = time.monotonic() + self.runs_deadline
        while True:
            for run_id in run_ids:
                if statuses[run_id] not in RESTING_STATUSES:
                    record = await self.backend.client.get_run_status(run_id)
                    statuses[run_id] = (record or {}).get("status")
            if all(status in RESTING_STATUSES for status in statuses.values()):
                return statuses
            self.check_alive()
            if time.monotonic() > deadline:
                pending = {r: s for r, s in statuses.items() if s not in RESTING_STATUSES}
                contexts = {r: await self.backend.client.create_context(r).load() or {}
                            for r in pending}
                pytest.fail(f"{len(pending)} of {RUNS} runs did not finish within "
                            f"{self.runs_deadline:g}s after the last start ({len(self.kills)} "
                            f"kills): {pending}\n" + self.describe(pending, contexts))
            await asyncio.sleep(1.0)

    async def explain_failure(self, run_id: str, data: Mapping[str, Any]) -> str:
        record = await self.backend.client.get_run_status(run_id) or {}
        node = record.get("failedNodeId")
        line = (f"  run {run_id}: {record.get('status')}: {record.get('error')}")
        if node and f"_outputs.{node}" in data:
            line += (f"\n    BUG: node '{node}' had completed (its output is committed, by "
                     f"execution {data.get(crash_nodes.EXECUTED_BY + node)}); a redelivered "
                     f"copy of its finished job was declared poison and failed the whole run")
        return line

    # -- checks ----------------------------------------------------------------------------

    def check_log(self, log: ExecutionLog, run_ids: list[str],
                  contexts: Mapping[str, Mapping[str, Any]]) -> None:
        problems = list(log.problems)
        worker_logs = "".join(self.read_log(f"worker-{i:02d}")
                              for i in range(1, self.spawned + 1))
        for run_id in run_ids:
            for node_id in NODE_IDS:
                runs = log.executions.get((run_id, node_id), [])
                where = f"run {run_id} node {node_id}"
                if not runs:
                    problems.append(f"{where}: never executed")
                    continue
                for previous, following in itertools.pairwise(runs):
                    killed_at = log.kills.get(previous.pid)
                    if killed_at is None or killed_at > following.start:
                        state = "ended" if previous.end is not None else "had not ended"
                        if f"run {run_id} node {node_id}: lease lost" in worker_logs:
                            state += ("; its worker then logged 'lease lost before commit': "
                                      "the lease lapsed while that worker was alive")
                        problems.append(
                            f"{where}: ran again (pid {following.pid}, log line "
                            f"{following.start + 1}) although its execution by pid "
                            f"{previous.pid} ({state}, line {previous.start + 1}) was not "
                            f"interrupted by a kill"
                            + ("" if killed_at is None else
                               f" before it (pid {previous.pid} killed at line "
                               f"{killed_at + 1})"))
                last = runs[-1]
                if last.end is None:
                    problems.append(f"{where}: its last execution (pid {last.pid}) never "
                                    f"ended, yet the run completed")
                committed_by = contexts[run_id].get(crash_nodes.EXECUTED_BY + node_id)
                if committed_by != last.name:
                    problems.append(f"{where}: the committed writes are those of execution "
                                    f"{committed_by}, not of its last execution "
                                    f"({last.name}; executions: {runs})")
        unknown = {key for key in log.executions if key[0] not in contexts}
        if unknown:
            problems.append(f"executions of unknown runs or nodes: {sorted(unknown)[:5]}")
        assert not problems, (f"{len(problems)} execution(s) not accounted for by a kill:\n"
                              + "\n".join(problems[:40]))

    def check_contexts(self, run_ids: list[str], contexts: Mapping[str, Mapping[str, Any]],
                       expected: Mapping[str, Any]) -> None:
        def comparable(context: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in context.items()
                    if k != "blueprintVersion" and not k.startswith(crash_nodes.EXECUTED_BY)}

        for run_id in run_ids:
            data = contexts[run_id]
            outputs = sorted(k for k in data if k.startswith("_outputs."))
            assert outputs == sorted(f"_outputs.{n}" for n in NODE_IDS), (run_id, outputs)
            assert data.get("blueprintVersion") == "1", run_id
            actual, wanted = comparable(public_view(data)), comparable(expected[run_id].context)
            if actual != wanted:
                differing = sorted(k for k in actual.keys() | wanted.keys()
                                   if actual.get(k) != wanted.get(k))
                pytest.fail(f"run {run_id}: the final context differs from the in-memory "
                            f"run's in {differing}: "
                            + "; ".join(f"{k}: {actual.get(k)!r} != {wanted.get(k)!r}"
                                        for k in differing[:5]))

    # -- reporting -------------------------------------------------------------------------

    def report(self, log: ExecutionLog, completed_after: float, total: float) -> None:
        reruns = [runs for runs in log.executions.values() if len(runs) > 1]
        rerun_after_end = sum(1 for runs in reruns for e in runs[:-1] if e.end is not None)
        interrupted = {pid: sum(1 for runs in log.executions.values() for e in runs
                                if e.pid == pid and e.end is None) for pid in log.kills}
        # Kills that cost node work: a node was running, or had ended and was not committed
        # yet (it ran again).
        costly = {e.pid for runs in log.executions.values() for e in runs
                  if e.pid in log.kills and (e.end is None or e is not runs[-1])}
        reconciler_log = self.read_log("reconciler")
        passes = re.findall(r"scanned (\d+) runs, (\d+) stalled, (\d+) reconciled, (\d+) "
                            r"failed", reconciler_log)
        re_enqueued = len(re.findall(r"reconciled: re-enqueued", reconciler_log))
        worker_logs = "".join(self.read_log(f"worker-{i:02d}")
                              for i in range(1, self.spawned + 1))
        print(
            f"\n[crash {self.backend.name}] seed {self.seed}: {RUNS} runs x {len(NODE_IDS)} "
            f"nodes completed after {completed_after:.1f}s ({total:.1f}s with the quiet "
            f"period); {len(self.kills)} kills, {sum(1 for n in interrupted.values() if n)} "
            f"of them mid-node ({sum(interrupted.values())} node executions interrupted), "
            f"{len(costly)} between a node's start and its commit; "
            f"{sum(len(r) - 1 for r in reruns)} re-executions over {len(reruns)} nodes, "
            f"{rerun_after_end} of them of an execution that had ended (killed before its "
            f"commit); reconciler: {len(passes)} passes, "
            f"{sum(int(p[2]) for p in passes)} run reconciliations, {re_enqueued} that "
            f"re-enqueued jobs; workers: "
            f"{worker_logs.count('already done (duplicate delivery)')} duplicate deliveries, "
            f"{worker_logs.count('retrying in')} jobs deferred (node leased), "
            f"{worker_logs.count('lease lost before commit')} lost leases, "
            f"{len(re.findall(r'flowcraft.distributed: .*removed as a poison', worker_logs))} "
            f"poison messages, "
            f"{worker_logs.count('Traceback')} tracebacks"
        )

    def read_log(self, name: str) -> str:
        path = self.tmp_path / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tails(self) -> str:
        tails = []
        for path in sorted(self.tmp_path.glob("*.log")):
            if path.name == self.log_path.name:
                continue
            text = path.read_text(errors="replace")
            interesting = [line for line in text.splitlines()
                           if any(w in line for w in ("ERROR", "WARNING", "Traceback", "Error"))]
            if interesting:
                tails.append(f"--- {path.name}:\n" + "\n".join(interesting[-15:]))
        return "\n".join(tails)

    def describe(self, run_ids: Mapping[str, Any],
                 contexts: Mapping[str, Mapping[str, Any]]) -> str:
        lines = []
        now = time.time()
        for run_id in list(run_ids)[:5]:
            data = contexts.get(run_id) or {}
            missing = [n for n in NODE_IDS if f"_outputs.{n}" not in data]
            leases = {k[len(LOCK_PREFIX):]: round(float(v.get("expires", 0)) - now, 1)
                      for k, v in data.items() if k.startswith(LOCK_PREFIX)}
            lines.append(f"  {run_id}: no output for {missing}; leases (s left) {leases}; "
                         f"run state {data.get('_flowcraft.run')}")
        lines.append(f"kills: {[(k.slot, k.pid, k.open_nodes) for k in self.kills]}")
        lines.append(self.log_tails())
        return "\n".join(lines)


# -- the tests -----------------------------------------------------------------------------


def crash_seed() -> int:
    return int(os.environ.get("FLOWCRAFT_CRASH_SEED") or random.randrange(1_000_000))


@pytest.mark.integration
@pytest.mark.timeout(420)
async def test_workers_killed_mid_run_on_aws(aws: Any, atomic_moto_dynamodb: None,
                                             processes: Processes, tmp_path: Path) -> None:
    from flowcraft.adapters.aws import DynamoDbCoordinationStore, SqsAdapter

    options = FlowRuntime(blueprints=load_blueprints(BLUEPRINTS_DIR),
                          registry=crash_nodes.registry).options
    client = SqsAdapter(
        options, DynamoDbCoordinationStore(client=aws.dynamodb,
                                           table_name=aws.coordination_table),
        aws.sqs, aws.dynamodb, aws.queue_url, context_table_name=aws.context_table,
        status_table_name=aws.status_table,
    )
    backend = Backend("aws", client, aws.environment())
    await CrashHarness(backend, processes, tmp_path, crash_seed()).run()


@pytest.mark.integration
@pytest.mark.timeout(420)
async def test_workers_killed_mid_run_on_azure(azure: Any, processes: Processes,
                                               tmp_path: Path) -> None:
    from flowcraft.adapters.azure import AzureQueueAdapter, RedisCoordinationStore

    options = FlowRuntime(blueprints=load_blueprints(BLUEPRINTS_DIR),
                          registry=crash_nodes.registry).options
    client = AzureQueueAdapter(
        options, RedisCoordinationStore(azure.redis), azure.queue, azure.cosmos,
        cosmos_database_name=azure.database, context_container_name=azure.context_container,
        status_container_name=azure.status_container,
    )
    backend = Backend("azure", client, azure.environment())
    await CrashHarness(backend, processes, tmp_path, crash_seed()).run()
