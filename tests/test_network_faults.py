"""Faults in the network: the crash scenario of ``tests/test_crash.py`` through fault proxies.

Every worker and the reconciler reach the services through a :class:`faultproxy.FaultProxy`
per service (AWS: one for SQS and one for DynamoDB, both in front of a moto server in a
process of its own; Azure: Azurite, a Cosmos DB server — TLS passes through — and Redis).
The test's own client, which starts the runs and checks them, connects directly. Once the
workers are up and while the 30 runs are in flight, the proxies add 0-50 ms of latency to
every chunk in each direction, reset half of one proxy's connections every few seconds,
and take each service down — refused, then black-holed, or the other way round — for 2-5 s
each (see :class:`NetworkFaults`). No worker is killed.

What must hold, as in the crash test: every run completes, its committed context equals
the in-memory runtime's, and each node's committed writes are those of its last execution.
A node may run more than once here (a lease that lapsed while a service was unreachable is
taken over), but no execution may start after another one's commit: the last execution is
the committed one, and every execution ended (no node does I/O of its own).

The Redis proxy carries no traffic in this scenario: the coordination store serves ``any``
joins and failure markers, and the fan-out / fan-in blueprint has neither.

The first tests check the proxy itself against an echo server (fast, no services).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import crash_nodes
from faultproxy import FaultProxy
from flowcraft import FlowRuntime
from flowcraft.blueprint import load_blueprints
from test_crash import (
    BLUEPRINTS_DIR,
    NODE_IDS,
    RUNS,
    Backend,
    CrashHarness,
    ExecutionLog,
    Processes,
    crash_seed,
    processes,  # noqa: F401 - the fixture
)

# -- the proxy itself --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[int, list[str]]]:
    """An echo server on a free loopback port; yields the port and a list of how each of
    its connections ended ("eof" or the error)."""
    endings: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            endings.append("eof")
        except OSError as exc:
            endings.append(type(exc).__name__)
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], endings


@pytest.fixture
def proxy_factory() -> Iterator[Any]:
    started: list[FaultProxy] = []

    def make(target_port: int, **options: Any) -> FaultProxy:
        proxy = FaultProxy(target_port, seed=7, **options).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     data: bytes, timeout: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def test_proxy_forwards_both_ways_and_passes_end_of_stream_on(proxy_factory: Any) -> None:
    async with echo_server() as (port, endings):
        proxy = proxy_factory(port)
        connections = [await connect(proxy) for _ in range(5)]
        payload = os.urandom(300_000)  # several chunks
        echoed = await asyncio.gather(*(round_trip(r, w, payload + bytes([i]))
                                        for i, (r, w) in enumerate(connections)))
        assert echoed == [payload + bytes([i]) for i in range(5)]
        for reader, writer in connections:
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        await until(lambda: len(endings) == 5)
        assert endings == ["eof"] * 5
        assert proxy.stats.accepted == 5
        assert proxy.stats.bytes_up == proxy.stats.bytes_down == 5 * (len(payload) + 1)


async def test_latency_delays_each_direction_and_keeps_the_order(proxy_factory: Any) -> None:
    async with echo_server() as (port, _):
        proxy = proxy_factory(port)
        reader, writer = await connect(proxy)
        await round_trip(reader, writer, b"warm")
        proxy.set_latency(0.15, direction="up")
        began = time.monotonic()
        await round_trip(reader, writer, b"x")
        assert 0.15 <= time.monotonic() - began < 2.0
        proxy.set_latency(0.0, 0.02)  # random per chunk, both ways: may not reorder
        messages = [f"{i:05d}".encode() for i in range(200)]
        for message in messages:
            writer.write(message)
            await writer.drain()
            await asyncio.sleep(0.001)
        received = await asyncio.wait_for(reader.readexactly(5 * len(messages)), 10)
        assert received == b"".join(messages)
        with pytest.raises(ValueError, match="low <= high"):
            proxy.set_latency(0.2, 0.1)
        writer.close()


async def test_reset_aborts_a_share_of_the_connections_on_both_sides(proxy_factory: Any) -> None:
    async with echo_server() as (port, endings):
        proxy = proxy_factory(port)
        connections = [await connect(proxy) for _ in range(4)]
        for reader, writer in connections:
            await round_trip(reader, writer, b"hello")
        assert proxy.reset(0.5) == 2
        survivors, broken = [], 0
        for reader, writer in connections:
            try:
                await round_trip(reader, writer, b"again", timeout=2)
                survivors.append(writer)
            except (ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError):
                broken += 1
        assert broken == 2 and len(survivors) == 2
        await until(lambda: len(endings) == 2)
        assert endings == ["ConnectionResetError"] * 2  # the service side saw a reset too
        assert proxy.stats.reset == 2 and proxy.open_connections == 2
        assert proxy.reset(1.0) == 2 and proxy.reset(1.0) == 0


async def test_refuse_takes_the_service_down_and_brings_it_back(proxy_factory: Any) -> None:
    async with echo_server() as (port, _):
        proxy = proxy_factory(port)
        reader, writer = await connect(proxy)
        await round_trip(reader, writer, b"up")
        proxy.refuse(0.5)
        assert proxy.faulty
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await round_trip(reader, writer, b"down", timeout=2)
        with pytest.raises(ConnectionRefusedError):
            await connect(proxy)
        await until(lambda: not proxy.faulty)
        reader, writer = await connect(proxy)  # the same port again
        assert await round_trip(reader, writer, b"back") == b"back"
        assert proxy.stats.refusals == [0.5] and not proxy.stats.errors
        writer.close()


async def test_blackhole_holds_everything_then_lets_it_through(proxy_factory: Any) -> None:
    async with echo_server() as (port, _):
        proxy = proxy_factory(port)
        reader, writer = await connect(proxy)
        await round_trip(reader, writer, b"before")
        began = time.monotonic()
        proxy.blackhole(0.6)
        writer.write(b"held")
        late_reader, late_writer = await connect(proxy)  # accepted, not connected upstream
        late_writer.write(b"late")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        assert await asyncio.wait_for(reader.readexactly(4), 3) == b"held"
        assert await asyncio.wait_for(late_reader.readexactly(4), 3) == b"late"
        assert time.monotonic() - began >= 0.6
        assert proxy.stats.blackholes == [0.6]
        writer.close()
        late_writer.close()


async def test_the_proxy_is_bounded_and_stops_itself(proxy_factory: Any) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(80, target_host="10.1.2.3")
    async with echo_server() as (port, _):
        # A lifetime long enough for the checks below on a busy machine, then it must end.
        proxy = proxy_factory(port, max_connections=2, lifetime_seconds=4.0)
        kept = [await connect(proxy) for _ in range(2)]
        for reader, writer in kept:
            await round_trip(reader, writer, b"ok")
        # The proxy takes the connection one too many and resets it: the reset can reach
        # the client while it is still connecting, or on its first round trip.
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            reader, writer = await connect(proxy)
            await round_trip(reader, writer, b"one too many", timeout=2)
        assert proxy.stats.rejected == 1
        await until(lambda: not proxy._thread.is_alive())  # its lifetime is over
        with pytest.raises(ConnectionRefusedError):  # and it let go of the port
            await connect(proxy)
        with pytest.raises(RuntimeError, match="stopped"):
            proxy.reset()


# -- the crash scenario through fault proxies --------------------------------------------------

LATENCY = (0.0, 0.05)
"""Seconds each chunk is held, per direction (a request and its response: 0-100 ms)."""
RESET_EVERY = (2.0, 4.0)
"""Seconds between resets; each resets half the open connections of one proxy."""
RESET_SHARE = 0.5
FIRST_OUTAGE_AFTER = 2.0
OUTAGE_EVERY = (5.2, 6.0)
"""Seconds from the start of one outage to the start of the next (longer than the longest
outage: one service is down at a time)."""
OUTAGE_SECONDS = (2.0, 5.0)
STALLED_THRESHOLD = 40.0
"""The reconciler's. No worker dies here, so no run should need it, unless a fault made a
worker drop a run's progress (as when a commit that applied but whose response was lost
was taken for a lost lease). The crash test's 20 s is near the time a job waits in the
backlog here (each service call is slower, and jobs wait out outages), and reconciling a
healthy run only duplicates its queued jobs, which deepens the backlog (see the crash
test)."""
RUNS_DEADLINE = 240.0
"""Seconds after the last start within which every run must have completed (as in the
crash test: on a quiet machine they complete well within half of it)."""
FAULT_WINDOW = 36.0
"""Resets and outages stop this many seconds after the load began (the runs are started
over the first 15 s; every planned outage has begun by then): what the faults left behind
must then be repaired within the test's time, not outrun by new faults."""


@dataclass
class Fault:
    at: float
    """Seconds after the faults began."""
    proxy: str
    kind: str
    """``reset``, ``refuse`` or ``blackhole``."""
    amount: float
    """Connections reset, or seconds down."""


class NetworkFaults:
    """The fault schedule, until the runs have completed.

    Latency on every proxy throughout; for the first ``FAULT_WINDOW`` seconds, every few
    seconds a reset of half of one proxy's connections, and outages, one at a time: first
    every service once (refused or black-holed, chosen at random), then every service once
    more the other way.
    """

    def __init__(self, proxies: Mapping[str, FaultProxy], rng: random.Random) -> None:
        self.proxies = proxies
        self.random = rng
        first = {name: rng.choice(["refuse", "blackhole"]) for name in proxies}
        rounds = [[(name, first[name]) for name in proxies],
                  [(name, "blackhole" if first[name] == "refuse" else "refuse")
                   for name in proxies]]
        for outages in rounds:
            rng.shuffle(outages)
        self.planned = [outage for outages in rounds for outage in outages]
        self.injected: list[Fault] = []

    async def run(self, stop: asyncio.Event) -> None:
        began = time.monotonic()
        for proxy in self.proxies.values():
            proxy.set_latency(*LATENCY)
        next_reset = self.random.uniform(*RESET_EVERY)
        next_outage = FIRST_OUTAGE_AFTER
        outages = list(self.planned)
        try:
            while not stop.is_set():
                due = min(next_reset, next_outage if outages else float("inf"))
                if due > FAULT_WINDOW:
                    await stop.wait()  # the latency stays
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, due - (time.monotonic()
                                                                       - began)))
                    break
                now = time.monotonic() - began
                if outages and now >= next_outage:
                    name, kind = outages.pop(0)
                    seconds = round(self.random.uniform(*OUTAGE_SECONDS), 1)
                    getattr(self.proxies[name], kind)(seconds)
                    self.injected.append(Fault(now, name, kind, seconds))
                    next_outage = now + self.random.uniform(*OUTAGE_EVERY)
                if now >= next_reset:
                    name = self.random.choice(sorted(self.proxies))
                    count = self.proxies[name].reset(RESET_SHARE)
                    self.injected.append(Fault(now, name, "reset", count))
                    next_reset = now + self.random.uniform(*RESET_EVERY)
        finally:
            for proxy in self.proxies.values():
                proxy.heal()

    def outages(self) -> list[Fault]:
        return [f for f in self.injected if f.kind != "reset"]

    def summary(self) -> str:
        resets = [f for f in self.injected if f.kind == "reset"]
        return (f"{len(resets)} resets ({int(sum(f.amount for f in resets))} connections), "
                f"outages: " + ", ".join(f"{f.proxy} {f.kind} {f.amount:g}s at {f.at:.1f}s"
                                         for f in self.outages()))


class NetworkFaultHarness(CrashHarness):
    """The crash scenario with network faults instead of kills."""

    stalled_threshold = STALLED_THRESHOLD
    runs_deadline = RUNS_DEADLINE

    def __init__(self, backend: Backend, started: Processes, tmp_path: Path, seed: int,
                 proxies: Mapping[str, FaultProxy], idle: frozenset[str] = frozenset()
                 ) -> None:
        super().__init__(backend, started, tmp_path, seed)
        self.proxies = proxies
        self.idle = idle
        """Proxies of services this scenario does not use."""
        self.faults = NetworkFaults(proxies, random.Random(seed))

    async def inject_faults(self, stop: asyncio.Event) -> None:
        await self.wait_until_ready()
        await self.faults.run(stop)

    async def wait_until_ready(self, timeout: float = 60.0) -> None:
        """Until every worker polls and the reconciler has made a pass: the faults are for
        processes at work (one that cannot reach a service as it starts exits at once)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = [self.read_log(f"worker-{i:02d}") for i in range(1, self.spawned + 1)]
            if (all("flowcraft worker (" in text for text in logs)
                    and "scanned " in self.read_log("reconciler")):
                return
            self.check_alive()
            await asyncio.sleep(0.2)
        pytest.fail(f"the workers and the reconciler did not start within {timeout:g}s:\n"
                    + self.log_tails())

    def check_log(self, log: ExecutionLog, run_ids: list[str],
                  contexts: Mapping[str, Mapping[str, Any]]) -> None:
        problems = list(log.problems)
        for run_id in run_ids:
            for node_id in NODE_IDS:
                runs = log.executions.get((run_id, node_id), [])
                where = f"run {run_id} node {node_id}"
                if not runs:
                    problems.append(f"{where}: never executed")
                    continue
                problems += [f"{where}: execution {e.name} (log line {e.start + 1}) never "
                             f"ended, but no worker was killed" for e in runs if e.end is None]
                committed_by = contexts[run_id].get(crash_nodes.EXECUTED_BY + node_id)
                if committed_by != runs[-1].name:
                    problems.append(
                        f"{where}: the committed writes are those of execution "
                        f"{committed_by}, not of its last execution ({runs[-1].name}): a "
                        f"node ran again after its commit, or a discarded execution's "
                        f"writes landed (executions: {runs})")
        unknown = {key for key in log.executions if key[0] not in contexts}
        if unknown:
            problems.append(f"executions of unknown runs or nodes: {sorted(unknown)[:5]}")
        assert not problems, (f"{len(problems)} execution(s) wrong:\n"
                              + "\n".join(problems[:40]))
        # Every service call must have gone through the proxies (a client that bypassed
        # one would make its faults moot): at least 1 kB per node execution.
        bypassed = {name: proxy.stats.bytes_up + proxy.stats.bytes_down
                    for name, proxy in self.proxies.items() if name not in self.idle and
                    proxy.stats.bytes_up + proxy.stats.bytes_down < 1000 * len(NODE_IDS) * RUNS}
        assert not bypassed, f"too little traffic went through these proxies: {bypassed}"
        missed = sorted(set(self.proxies) - {f.proxy for f in self.faults.outages()})
        assert not missed, (f"the runs completed before {missed} went down: the schedule "
                            f"no longer covers every service ({self.faults.summary()})")

    def report(self, log: ExecutionLog, completed_after: float, total: float) -> None:
        reruns = [runs for runs in log.executions.values() if len(runs) > 1]
        worker_logs = "".join(self.read_log(f"worker-{i:02d}")
                              for i in range(1, self.spawned + 1))
        reconciler_log = self.read_log("reconciler")
        re_enqueued = len(re.findall(r"reconciled: re-enqueued", reconciler_log))
        proxies = "; ".join(
            f"{name}: {p.stats.accepted} connections, {p.stats.reset} reset, "
            f"{p.stats.bytes_up + p.stats.bytes_down} bytes"
            + (f", ERRORS {p.stats.errors}" if p.stats.errors else "")
            for name, p in self.proxies.items())
        print(
            f"\n[network faults {self.backend.name}] seed {self.seed}: {len(log.executions)} "
            f"node runs completed after {completed_after:.1f}s ({total:.1f}s with the quiet "
            f"period); faults: {self.faults.summary()}; proxies: {proxies}; "
            f"{sum(len(r) - 1 for r in reruns)} re-executions over {len(reruns)} nodes; "
            f"reconciler: {re_enqueued} reconciliations that re-enqueued jobs; workers: "
            f"{worker_logs.count('lease lost before commit')} lost leases, "
            f"{worker_logs.count('unexpected error')} jobs failed by an error (redelivered), "
            f"{worker_logs.count('receiving failed')} failed receives, "
            f"{worker_logs.count('lease renewal failed')} failed lease renewals, "
            f"{worker_logs.count('could not extend visibility')} failed visibility "
            f"extensions, {worker_logs.count('already done (duplicate delivery)')} duplicate "
            f"deliveries, "
            f"{len(re.findall(r'flowcraft.distributed: .*removed as a poison', worker_logs))} "
            f"poison messages, {worker_logs.count('Traceback')} tracebacks"
        )


def runtime_options() -> Any:
    return FlowRuntime(blueprints=load_blueprints(BLUEPRINTS_DIR),
                       registry=crash_nodes.registry).options


_RUN_MOTO = """
import sys, threading
from flowcraft.local import moto_server
with moto_server(int(sys.argv[1])):
    threading.Event().wait()
"""


@contextlib.contextmanager
def moto_process(log_dir: Path) -> Iterator[int]:
    """A moto server in a process of its own (with DynamoDB's writes made atomic, as
    :func:`flowcraft.local.moto_server` makes them): in this process it would
    compete with the proxies for the interpreter, and stretch their latencies."""
    from flowcraft.local import LocalProcess, free_port

    port = free_port()
    process = LocalProcess("moto", [sys.executable, "-c", _RUN_MOTO, str(port)], port,
                           log_dir)
    process.start()
    try:
        yield port
    finally:
        process.stop()


@pytest.mark.integration
@pytest.mark.timeout(420)
async def test_runs_complete_through_network_faults_on_aws(
        processes: Processes, tmp_path: Path) -> None:  # noqa: F811
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws import (
        AwsNames,
        DynamoDbCoordinationStore,
        SqsAdapter,
        provision_aws,
    )
    from flowcraft.local import LOCAL_AWS_CREDENTIALS

    seed = crash_seed()
    suffix = os.urandom(4).hex()
    names = AwsNames(f"jobs-{suffix}", f"contexts-{suffix}", f"statuses-{suffix}",
                     f"coordination-{suffix}")
    with contextlib.ExitStack() as stack:
        port = stack.enter_context(moto_process(tmp_path))
        # One proxy per service, both in front of the one moto server: SQS and DynamoDB
        # fail separately, as two services do.
        proxies = {name: stack.enter_context(FaultProxy(port, name=name, seed=seed + i))
                   for i, name in enumerate(("sqs", "dynamodb"))}
        session = get_session()
        options = {"region_name": "us-east-1", "endpoint_url": f"http://127.0.0.1:{port}",
                   "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        # The test's own clients connect directly.
        async with session.create_client("sqs", **options) as sqs, session.create_client(
                "dynamodb", **options) as dynamodb:
            provisioned = await provision_aws(sqs, dynamodb, names)
            client = SqsAdapter(
                runtime_options(), DynamoDbCoordinationStore(
                    client=dynamodb, table_name=names.coordination_table),
                sqs, dynamodb, provisioned["queueUrl"], context_table_name=names.context_table,
                status_table_name=names.status_table,
            )
            environment = {
                **{k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"},
                **LOCAL_AWS_CREDENTIALS, "SQS_QUEUE_URL": provisioned["queueUrl"],
                "FLOWCRAFT_QUEUE_NAME": names.queue_name,
                "FLOWCRAFT_CONTEXT_TABLE": names.context_table,
                "FLOWCRAFT_STATUS_TABLE": names.status_table,
                "FLOWCRAFT_COORDINATION_TABLE": names.coordination_table,
                # Per-service endpoints (AWS_ENDPOINT_URL would name one for both).
                "AWS_ENDPOINT_URL_SQS": f"http://{proxies['sqs'].address}",
                "AWS_ENDPOINT_URL_DYNAMODB": f"http://{proxies['dynamodb'].address}",
            }
            harness = NetworkFaultHarness(Backend("aws", client, environment), processes,
                                          tmp_path, seed, proxies)
            await harness.run()


# The local Cosmos server tells clients to use the address it listens on (its account's
# locations), and the SDK then sends every request there: behind a proxy, the clients would
# bypass it after their first request. A Cosmos account names its public endpoint, which
# clients reach through whatever network lies between; so this server is started with its
# advertised port set to the proxy's (its listening port is unchanged).
_ADVERTISE_PORT = """
const net = require("net");
const address = net.Server.prototype.address;
const advertised = Number(process.env.COSMOS_ADVERTISED_PORT);
net.Server.prototype.address = function () {
  const real = address.call(this);
  return real && typeof real === "object" ? { ...real, port: advertised } : real;
};
const [cli, ...args] = process.argv.slice(1);
process.argv = [process.argv[0], cli, ...args];
require(cli);
"""


@contextlib.contextmanager
def cosmos_advertising(port: int, advertised_port: int, log_dir: Path) -> Iterator[int]:
    """A Cosmos DB server on ``port`` whose account names ``advertised_port``."""
    import shutil

    from flowcraft.local import LocalProcess, node_binary

    node = shutil.which("node")
    assert node, "node is not installed: run scripts/setup"
    cli = str(Path(node_binary("cosmosdb-server")).resolve())
    process = LocalProcess("cosmosdb-server-behind-proxy", [
        node, "-e", _ADVERTISE_PORT, cli, "--host", "127.0.0.1", "-p", str(port),
    ], port, log_dir)
    os.environ["COSMOS_ADVERTISED_PORT"] = str(advertised_port)
    try:
        process.start()
    finally:
        del os.environ["COSMOS_ADVERTISED_PORT"]
    try:
        yield port
    finally:
        process.stop()


@pytest.mark.integration
@pytest.mark.timeout(420)
async def test_runs_complete_through_network_faults_on_azure(
        azure_services_session: Any, processes: Processes,  # noqa: F811
        tmp_path: Path) -> None:
    import redis.asyncio as redis_asyncio
    from azure.cosmos.aio import CosmosClient
    from azure.storage.queue.aio import QueueClient, QueueServiceClient

    from flowcraft.adapters.azure import (
        AzureNames,
        AzureQueueAdapter,
        RedisCoordinationStore,
        provision_azure,
    )
    from flowcraft.local import AzureEndpoints, free_port

    seed = crash_seed()
    services = azure_services_session
    direct = services.endpoints
    suffix = os.urandom(4).hex()
    names = AzureNames(f"jobs-{suffix}", f"db-{suffix}", "contexts", "statuses")
    cosmos_port, cosmos_proxy_port = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(cosmos_advertising(cosmos_port, cosmos_proxy_port, tmp_path))
        proxies = {
            "azurite": FaultProxy(services.azurite.port, name="azurite", seed=seed),
            "cosmos": FaultProxy(cosmos_port, name="cosmos", port=cosmos_proxy_port,
                                 seed=seed + 1),
            "redis": FaultProxy(services.redis.port, name="redis", seed=seed + 2),
        }
        for proxy in proxies.values():
            stack.enter_context(proxy)
        through = AzureEndpoints(
            direct.storage_connection_string.replace(f":{services.azurite.port}/",
                                                     f":{proxies['azurite'].port}/"),
            f"https://{proxies['cosmos'].address}", direct.cosmos_key,
            f"redis://{proxies['redis'].address}/0")
        assert through.storage_connection_string != direct.storage_connection_string
        environment = {
            **os.environ, **through.environment(), "FLOWCRAFT_QUEUE_NAME": names.queue_name,
            "FLOWCRAFT_COSMOS_DATABASE": names.database,
            "FLOWCRAFT_CONTEXT_CONTAINER": names.context_container,
            "FLOWCRAFT_STATUS_CONTAINER": names.status_container,
        }
        # The test's own clients connect directly (and keep to the endpoint they are given).
        queue_service = QueueServiceClient.from_connection_string(
            direct.storage_connection_string)
        queue = QueueClient.from_connection_string(direct.storage_connection_string,
                                                   names.queue_name)
        cosmos = CosmosClient(f"https://127.0.0.1:{cosmos_port}", credential=direct.cosmos_key,
                              connection_verify=False, enable_endpoint_discovery=False)
        redis = redis_asyncio.from_url(direct.redis_url)
        async with queue_service, queue, cosmos:
            try:
                await provision_azure(queue_service, cosmos, names)
                client = AzureQueueAdapter(
                    runtime_options(), RedisCoordinationStore(redis), queue, cosmos,
                    cosmos_database_name=names.database,
                    context_container_name=names.context_container,
                    status_container_name=names.status_container,
                )
                harness = NetworkFaultHarness(Backend("azure", client, environment),
                                              processes, tmp_path, seed, proxies,
                                              idle=frozenset({"redis"}))
                await harness.run()
            finally:
                await redis.aclose()


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_the_reconcile_command_outlives_a_service_outage(
        aws: Any, processes: Processes, tmp_path: Path) -> None:  # noqa: F811
    """``flowcraft reconcile --every`` is a long-running process: a pass that fails
    because a service is unreachable is retried at the next interval, not fatal."""
    with FaultProxy(aws.endpoint.port, name="aws") as proxy:
        proxy.refuse(4.0)
        environment = {**aws.environment(), "AWS_ENDPOINT_URL": f"http://{proxy.address}",
                       "AWS_MAX_ATTEMPTS": "1"}  # fail at once, not after the SDK's retries
        reconciler = processes.spawn("reconciler", [
            sys.executable, "-m", "flowcraft", "reconcile", "aws", "--registry",
            "crash_nodes:registry", "--blueprints", str(BLUEPRINTS_DIR), "--every", "0.5",
            "--stalled-threshold", "20",
        ], {**environment, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).parent), environment.get("PYTHONPATH")) if p)})
        log = tmp_path / "reconciler.log"
        deadline = time.monotonic() + 60
        while "scanned 0 runs" not in (log.read_text() if log.exists() else ""):
            assert reconciler.poll() is None, (
                f"the reconciler exited ({reconciler.returncode}) while the service was "
                f"down:\n{log.read_text()}")
            assert time.monotonic() < deadline, f"no pass succeeded:\n{log.read_text()}"
            await asyncio.sleep(0.2)
        assert proxy.stats.refusals == [4.0]
        assert "failed" in log.read_text()  # it did meet the outage
