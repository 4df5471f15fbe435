"""One behaviour suite for every backend: the in-process one, AWS (SQS + DynamoDB on a moto
server) and Azure (Azurite + the local Cosmos DB server + redis-server).

Each test runs three times, on the ``backend`` fixture's parameters. A backend is reached
only through public constructors (``InProcessAdapter``, ``SqsAdapter``,
``AzureQueueAdapter``) and its services' own clients; the :class:`Backend` it yields builds
workers and clients and looks at the queue the way an operator would (send a raw message,
take or peek at messages, count them, read the dead letters). What the backends share is
tested here: running runs to completion, joins, conditional routing, failures, poison and
malformed messages, waits and resumes, duplicate deliveries, stopping workers, durable
sleeps, item size limits, the reconciler. What only one backend does (its item layout, the
TypeScript library's clients, dead-letter plumbing, Redis restarts, throttling) stays in
tests/test_aws_adapter.py and tests/test_azure_adapter.py.

The AWS queue gets a dead-letter queue (a ``RedrivePolicy``), as a deployment has, so that
dead letters can be read on every backend; the in-process queue keeps them in a list.

Deliveries (how often a worker received a job's message) are read from the worker's log
lines: every line logged while a job is handled carries its node and the message's receive
count (:func:`flowcraft.observability.current_log_context`).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

import pytest

import aws_helpers
import azure_helpers
from distributed_helpers import Executions, comparable, oracle
from flowcraft import (
    AsyncContext,
    ContextTooLargeError,
    Flow,
    FlowRuntime,
    NodeContext,
    NodeResult,
    WorkflowBlueprint,
)
from flowcraft.distributed import (
    BaseDistributedAdapter,
    CoordinationStore,
    InMemoryCoordinationStore,
    InMemoryRunStore,
    InProcessAdapter,
    InProcessQueue,
    QueueMessage,
    Reconciler,
)
from flowcraft.distributed.coordination import cancel_key, poison_key
from flowcraft.distributed.job import JobPayload
from flowcraft.observability import current_log_context

pytestmark = pytest.mark.integration

# =============================================================================================
# The backends
# =============================================================================================


class Backend(abc.ABC):
    """Workers, clients and a look at the queue, on one backend."""

    name: str
    limit_bytes: int | None = None
    """The item size limit of the run store (``None``: no limit)."""
    service: str | None = None
    """The run store's name in a ``ContextTooLargeError``."""
    lists_only_stalled = True
    """The reconciler's status query returns only runs not updated within its threshold
    (an index or a query); otherwise it reads every running run and decides itself."""

    def __init__(self) -> None:
        self.started: list[BaseDistributedAdapter] = []

    async def prepare(self) -> None:
        """Anything the backend needs before the first worker (called by the fixture)."""

    async def close(self) -> None:
        for worker in self.started:
            with contextlib.suppress(Exception):
                await worker.stop(timeout_seconds=5)

    @abc.abstractmethod
    def worker(self, blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
               **options: Any) -> BaseDistributedAdapter:
        """A worker (and client), not started, with options that keep tests quick."""

    @contextlib.asynccontextmanager
    async def workers(self, blueprints: Iterable[WorkflowBlueprint],
                      registry: Mapping[str, Any], count: int = 1,
                      **options: Any) -> AsyncIterator[list[BaseDistributedAdapter]]:
        """``count`` started workers (a ``worker_id`` gets ``-1``, ``-2``... appended);
        stopped on exit."""
        blueprints = list(blueprints)
        started = []
        for i in range(count):
            extra = ({"worker_id": f"{options['worker_id']}-{i + 1}"}
                     if "worker_id" in options else {})
            started.append(self.worker(blueprints, registry, **{**options, **extra}))
        for worker in started:
            await worker.start()
        try:
            yield started
        finally:
            for worker in started:
                await worker.stop(timeout_seconds=5)

    @abc.abstractmethod
    async def send_raw(self, body: str) -> None:
        """Put a message on the job queue as it is (another producer's message)."""

    @abc.abstractmethod
    async def take_bodies(self) -> list[str]:
        """Receive and delete every visible message (they are lost): their bodies."""

    @abc.abstractmethod
    async def peek_bodies(self) -> list[str]:
        """The bodies of the visible messages, left visible."""

    @abc.abstractmethod
    async def message_count(self) -> int:
        """Every message of the job queue: visible, received or delayed."""

    @abc.abstractmethod
    async def dead_letters(self) -> list[str]:
        """The bodies of the messages dead-lettered so far."""

    @abc.abstractmethod
    def reconciler(self, adapter: BaseDistributedAdapter,
                   stalled_threshold_seconds: float) -> Reconciler: ...

    @abc.abstractmethod
    def exports(self) -> tuple[ModuleType, set[str]]:
        """The backend's public module and the names it must export."""

    def job_of(self, body: str) -> dict[str, Any]:
        return dict(json.loads(body))

    async def wait_queue_empty(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while (count := await self.message_count()) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} message(s) left after {timeout:g}s")
            await asyncio.sleep(0.1)

    @staticmethod
    def runtime(blueprints: Iterable[WorkflowBlueprint],
                registry: Mapping[str, Any]) -> FlowRuntime:
        return FlowRuntime(blueprints={bp.id: bp for bp in blueprints}, registry=dict(registry))


class _RememberingQueue(InProcessQueue):
    """The in-process queue, remembering each received message's body by its id (the
    dead letters are kept by id)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies_by_id: dict[str, str] = {}

    async def receive(self, *args: Any, **kwargs: Any) -> list[QueueMessage]:
        messages = await super().receive(*args, **kwargs)
        self.bodies_by_id.update((m.message_id, str(m.body)) for m in messages)
        return messages


class MemoryBackend(Backend):
    name = "memory"
    lists_only_stalled = False

    def __init__(self) -> None:
        super().__init__()
        self.queue = _RememberingQueue()
        self.store = InMemoryRunStore()
        self.statuses: dict[str, dict[str, Any]] = {}
        self.coordination = InMemoryCoordinationStore()

    def worker(self, blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
               **options: Any) -> InProcessAdapter:
        fast = {"poll_wait_seconds": 0.2, "lease_seconds": 5, "status_touch_seconds": 0}
        return InProcessAdapter(self.runtime(blueprints, registry).options, self.coordination,
                                queue=self.queue, store=self.store, statuses=self.statuses,
                                **{**fast, **options})

    async def send_raw(self, body: str) -> None:
        await self.queue.send([body])

    async def take_bodies(self) -> list[str]:
        messages = await self.queue.receive(100, 0, 30)
        await self.queue.delete(messages)
        return [str(m.body) for m in messages]

    async def peek_bodies(self) -> list[str]:
        return [str(m.body) for m in await self.queue.receive(100, 0, 0)]

    async def message_count(self) -> int:
        return len(self.queue)

    async def dead_letters(self) -> list[str]:
        return [self.queue.bodies_by_id[message_id] for message_id, _ in self.queue.dead_letters]

    def reconciler(self, adapter: BaseDistributedAdapter,
                   stalled_threshold_seconds: float) -> Reconciler:
        async def running() -> AsyncIterator[dict[str, Any]]:
            for record in list(self.statuses.values()):
                if record.get("status") == "running":
                    yield dict(record)

        return Reconciler(adapter, running, stalled_threshold_seconds)

    def exports(self) -> tuple[ModuleType, set[str]]:
        import flowcraft.distributed as module

        return module, {"InProcessAdapter", "InProcessQueue", "InMemoryRunStore",
                        "InMemoryCoordinationStore", "Reconciler"}


class AwsBackend(Backend):
    name = "aws"
    service = "DynamoDB"

    def __init__(self, aws: Any) -> None:
        from flowcraft.adapters.aws._dynamo import ITEM_LIMIT_BYTES

        super().__init__()
        self.aws = aws
        self.limit_bytes = ITEM_LIMIT_BYTES
        self.dead_letter_url = ""

    async def prepare(self) -> None:
        sqs = self.aws.sqs
        self.dead_letter_url = (await sqs.create_queue(
            QueueName=f"{self.aws.queue_name}-dlq"))["QueueUrl"]
        arn = (await sqs.get_queue_attributes(QueueUrl=self.dead_letter_url,
                                              AttributeNames=["QueueArn"]))["Attributes"][
            "QueueArn"]
        await sqs.set_queue_attributes(QueueUrl=self.aws.queue_url, Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "10"})})

    def worker(self, blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
               **options: Any) -> BaseDistributedAdapter:
        from flowcraft.adapters.aws import DynamoDbCoordinationStore, SqsAdapter

        aws = self.aws
        return SqsAdapter(
            self.runtime(blueprints, registry).options,
            DynamoDbCoordinationStore(client=aws.dynamodb, table_name=aws.coordination_table),
            aws.sqs, aws.dynamodb, aws.queue_url, context_table_name=aws.context_table,
            status_table_name=aws.status_table, **{**aws_helpers.FAST, **options})

    async def send_raw(self, body: str) -> None:
        await self.aws.sqs.send_message(QueueUrl=self.aws.queue_url, MessageBody=body)

    async def take_bodies(self) -> list[str]:
        return [m["Body"] for m in await aws_helpers.receive_all(self.aws.sqs,
                                                                 self.aws.queue_url)]

    async def peek_bodies(self) -> list[str]:
        return [m["Body"] for m in await aws_helpers.peek(self.aws.sqs, self.aws.queue_url)]

    async def message_count(self) -> int:
        return sum((await aws_helpers.queue_counts(self.aws.sqs, self.aws.queue_url)).values())

    async def dead_letters(self) -> list[str]:
        return [m["Body"] for m in await aws_helpers.receive_all(self.aws.sqs,
                                                                 self.dead_letter_url)]

    def reconciler(self, adapter: BaseDistributedAdapter,
                   stalled_threshold_seconds: float) -> Reconciler:
        from flowcraft.adapters.aws import SqsAdapter, create_sqs_reconciler

        assert isinstance(adapter, SqsAdapter)
        return create_sqs_reconciler(adapter, self.aws.dynamodb, self.aws.status_table,
                                     stalled_threshold_seconds)

    def exports(self) -> tuple[ModuleType, set[str]]:
        import flowcraft.adapters.aws as module

        return module, {"SqsAdapter", "DynamoDbContext", "DynamoDbCoordinationStore",
                        "create_sqs_reconciler"}


class AzureBackend(Backend):
    name = "azure"
    service = "Cosmos DB"

    def __init__(self, azure: Any) -> None:
        from flowcraft.adapters.azure._cosmos import ITEM_LIMIT_BYTES

        super().__init__()
        self.azure = azure
        self.limit_bytes = ITEM_LIMIT_BYTES

    def worker(self, blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
               **options: Any) -> BaseDistributedAdapter:
        from flowcraft.adapters.azure import AzureQueueAdapter, RedisCoordinationStore

        azure = self.azure
        return AzureQueueAdapter(
            self.runtime(blueprints, registry).options,
            RedisCoordinationStore(azure.redis, reconnect_seconds=30), azure.queue, azure.cosmos,
            cosmos_database_name=azure.database, context_container_name=azure.context_container,
            status_container_name=azure.status_container,
            **{**azure_helpers.FAST, **options})

    async def send_raw(self, body: str) -> None:
        await self.azure.queue.send_message(body)

    async def take_bodies(self) -> list[str]:
        return [m.content for m in await azure_helpers.receive_all(self.azure.queue)]

    async def peek_bodies(self) -> list[str]:
        return [m.content for m in await azure_helpers.peek(self.azure.queue)]

    async def message_count(self) -> int:
        return await azure_helpers.message_count(self.azure.queue)

    async def dead_letters(self) -> list[str]:
        poison = azure_helpers.poison_client(self.azure)
        return [m.content for m in await azure_helpers.receive_all(poison)]

    def reconciler(self, adapter: BaseDistributedAdapter,
                   stalled_threshold_seconds: float) -> Reconciler:
        from flowcraft.adapters.azure import AzureQueueAdapter, create_azure_reconciler

        assert isinstance(adapter, AzureQueueAdapter)
        return create_azure_reconciler(adapter, self.azure.cosmos, self.azure.database,
                                       self.azure.status_container, stalled_threshold_seconds)

    def exports(self) -> tuple[ModuleType, set[str]]:
        import flowcraft.adapters.azure as module

        return module, {"AzureQueueAdapter", "CosmosDbContext", "RedisCoordinationStore",
                        "create_azure_reconciler"}

    def job_of(self, body: str) -> dict[str, Any]:
        return azure_helpers.decode(body)


def _make_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    if name == "memory":
        return MemoryBackend()
    if name == "aws":
        # moto applies concurrent updates of one item non-atomically (see aws_helpers).
        aws_helpers.make_moto_dynamodb_atomic(request.getfixturevalue("monkeypatch"))
        return AwsBackend(request.getfixturevalue("aws"))
    return AzureBackend(request.getfixturevalue("azure"))


# The services' fixtures are asynchronous: they are set up by these synchronous fixtures,
# and the asynchronous ``backend`` fixtures finish the backend on the test's event loop.


@pytest.fixture(params=["memory", "aws", "azure"])
def _any_backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


@pytest.fixture(params=["aws", "azure"])
def _limited_backend(request: pytest.FixtureRequest) -> Backend:
    return _make_backend(request.param, request)


@pytest.fixture
async def backend(_any_backend: Backend) -> AsyncIterator[Backend]:
    await _any_backend.prepare()
    yield _any_backend
    await _any_backend.close()


@pytest.fixture
async def limited_backend(_limited_backend: Backend) -> AsyncIterator[Backend]:
    """The backends whose run store has an item size limit."""
    await _limited_backend.prepare()
    yield _limited_backend
    await _limited_backend.close()


class Deliveries(logging.Handler):
    """``(node_id, receive count, worker id)`` of every log line written while a worker
    handled a received message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = current_log_context()
        if "node_id" in fields and "attempt" in fields:
            self.seen.append((fields["node_id"], fields["attempt"], fields.get("worker_id", "")))

    def counts(self, node_id: str) -> set[int]:
        return {attempt for node, attempt, _ in self.seen if node == node_id}


@pytest.fixture
def deliveries() -> Iterator[Deliveries]:
    handler = Deliveries()
    logger = logging.getLogger("flowcraft")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def chain(flow_id: str, runs: Executions, *node_ids: str) -> Flow:
    flow = Flow(flow_id)
    for node_id in node_ids:
        flow.node(node_id, runs.node())
    for source, target in itertools.pairwise(node_ids):
        flow.edge(source, target)
    return flow


def logged_node(runs: Executions, compute: Any = None, *, delay: float = 0.0) -> Any:
    """A recorded node that also writes a log line (so its delivery is seen)."""
    inner = runs.node(compute, delay=delay)

    async def node(ctx: NodeContext) -> Any:
        logging.getLogger("flowcraft.test").info("running %s", ctx.node_id)
        return await inner(ctx)

    return node


# =============================================================================================
# Runs, joins and routing
# =============================================================================================


async def test_client_starts_a_run_and_workers_complete_it(backend: Backend) -> None:
    runs = Executions()

    async def total(ctx: NodeContext) -> Any:
        runs.record(ctx)
        order = await ctx.context.get("order")
        await ctx.context.set("seen", {"qty": order["qty"], "price": order["price"]})
        return order["qty"] * order["price"]

    async def check(ctx: NodeContext) -> Any:
        runs.record(ctx)
        seen = await ctx.context.get("seen")
        assert type(seen["qty"]) is int and type(seen["price"]) is float  # stored, read back
        assert type(ctx.input) is float
        return {"total": ctx.input, "ok": True}

    flow = Flow("orders", version="3").node("total", total).node("check", check).edge(
        "total", "check")
    bp = flow.to_blueprint()
    client = backend.worker([bp], flow.registry())
    run_id = await client.start_workflow(bp, {"order": {"qty": 3, "price": 2.5},
                                              "tenant": "t1"})
    status = await client.get_run_status(run_id)
    assert status is not None
    assert status["status"] == "running" and status["runId"] == run_id
    assert status["blueprintId"] == "orders" and isinstance(status["lastUpdated"], str)
    assert await client.get_run_status("no-such-run") is None
    with pytest.raises(TimeoutError, match=run_id):
        await client.wait_for_result(run_id, timeout=0.3)  # no worker yet

    # Upper-case worker ids: lease owners appear in the conditions of claims and commits.
    async with backend.workers([bp], flow.registry(), count=2, worker_id="EU-West-Worker"):
        result = await client.wait_for_result(run_id, timeout=20)
        await backend.wait_queue_empty()
    assert result.status == "completed", result.errors
    assert result.run_id == run_id
    assert result.context["_outputs.check"] == {"total": 7.5, "ok": True}
    assert result.context["blueprintVersion"] == "3"
    assert result.context["tenant"] == "t1"
    assert dict(runs.counts) == {"total": 1, "check": 1}
    final = await client.get_run_status(run_id)
    assert final is not None
    assert final["status"] == "completed" and final["finalStatus"] == "completed"


async def test_handle_job_runs_one_job_for_serverless_handlers(backend: Backend) -> None:
    """``handle_job`` without polling, as a Lambda or Functions queue trigger calls it."""
    runs = Executions()
    flow = (Flow("serverless").node("a", runs.node()).node("b", runs.node())
            .node("c", runs.node()).edge("a", "b").edge("a", "c"))
    bp = flow.to_blueprint()
    handler = backend.worker([bp], flow.registry())
    run_id = await handler.start_workflow(bp, {})
    [start] = await backend.take_bodies()
    assert await handler.handle_job(start) == "processed"
    assert await handler.handle_job(start) == "duplicate"
    for _ in range(10):
        for body in await backend.take_bodies():
            assert await handler.handle_job(body) in ("processed", "duplicate")
        status = await handler.get_run_status(run_id)
        if status is not None and status["status"] == "completed":
            break
    assert (await handler.wait_for_result(run_id, timeout=5)).status == "completed"
    assert dict(runs.counts) == {"a": 1, "b": 1, "c": 1}


async def test_a_user_key_named_context_is_kept(backend: Backend) -> None:
    """A context key named like a backend's own item properties is the user's."""
    runs = Executions()
    flow = Flow("ctxkey").node("a", runs.node(lambda ctx: "ok"))
    bp = flow.to_blueprint()
    initial = {"context": {"user": "Ada"}, "id": "mine", "n": 1}
    async with backend.workers([bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, initial)
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.context["context"] == {"user": "Ada"} and result.context["id"] == "mine"
    assert "user" not in result.context


async def test_fan_in_all_matches_the_in_memory_run(backend: Backend) -> None:
    runs = Executions()
    flow = Flow("fan-all").node("s", runs.node(lambda ctx: 1))
    for branch in ("b0", "b1", "b2"):
        flow.node(branch, runs.node(lambda ctx: [ctx.node_id, ctx.input]))
        flow.edge("s", branch).edge(branch, "j")
    flow.node("j", runs.node(lambda ctx: ctx.input))
    bp = flow.to_blueprint()
    expected = await oracle(bp, flow.registry(), {"in": 1}, run_id="fan-all-run")
    assert expected.status == "completed", expected.errors
    runs.reset()
    async with backend.workers([bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {"in": 1}, run_id="fan-all-run")
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.j"] == {"b0": ["b0", 1], "b1": ["b1", 1], "b2": ["b2", 1]}
    assert runs.counts == {"s": 1, "b0": 1, "b1": 1, "b2": 1, "j": 1}


async def test_a_wide_fan_runs_each_branch_once_from_items_of_their_own(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fan wide enough that its branches are stored in items of their own: the same
    result as in memory, each branch once although the start job is delivered twice, and
    the run's item holds a marker instead of the branches' records."""
    from flowcraft.core import graph
    from flowcraft.distributed.homes import items_key

    monkeypatch.setattr(graph, "WIDE_FAN_MIN_BRANCHES", 8)  # the real one: a slow test
    runs = Executions()
    width = 10
    flow = Flow("wideFan").node("s", runs.node(lambda ctx: 1))
    for index in range(width):
        flow.node(f"b{index}", runs.node(lambda ctx: ctx.input + int(ctx.node_id[1:])))
        flow.edge("s", f"b{index}").edge(f"b{index}", "j")
    flow.node("j", runs.node(lambda ctx: sum(ctx.input.values())))
    bp = flow.to_blueprint()
    expected = await oracle(bp, flow.registry(), {}, run_id="wide-fan-run")
    runs.reset()
    client = backend.worker([bp], flow.registry())
    run_id = await client.start_workflow(bp, {}, run_id="wide-fan-run")
    [start] = await backend.peek_bodies()
    await backend.send_raw(start)
    async with backend.workers([bp], flow.registry(), count=3) as (worker, *_):
        result = await worker.wait_for_result(run_id, timeout=60)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.j"] == sum(1 + index for index in range(width))
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    stored = await client.backend.runs.context(run_id).load() or {}
    assert items_key("s") in stored
    assert not [key for key in stored if key.startswith("_flowcraft.node.b")]


async def test_fan_in_any_runs_once_on_the_first_arrival(backend: Backend) -> None:
    """An ``any`` join runs once, on the first arrival; an ``all`` join on the same
    predecessors waits for both."""
    runs = Executions()
    flow = (Flow("fan-any")
            .node("s", runs.node(lambda ctx: "go"))
            .node("fast", runs.node(lambda ctx: "fast"))
            .node("slow", runs.node(lambda ctx: "slow", delay=1.5))
            .node("j", runs.node(lambda ctx: {"got": ctx.input}), join_strategy="any")
            .node("all", runs.node(lambda ctx: ctx.input), join_strategy="all")
            .node("k", runs.node())
            .edge("s", "fast").edge("s", "slow").edge("fast", "j").edge("slow", "j")
            .edge("fast", "all").edge("slow", "all").edge("j", "k"))
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await backend.wait_queue_empty()
    assert result.status == "completed", result.errors
    assert result.context["_outputs.j"] == {"got": "fast"}
    assert result.context["_outputs.all"] == {"fast": "fast", "slow": "slow"}
    assert result.context["_outputs.slow"] == "slow"  # the run ended after the late branch
    assert runs.counts == {"s": 1, "fast": 1, "slow": 1, "j": 1, "all": 1, "k": 1}


async def test_conditional_diamond_converges_and_skips_propagate(backend: Backend) -> None:
    runs = Executions()
    flow = (Flow("diamond")
            .node("s", runs.node(lambda ctx: {"go": ctx.input}), inputs="side")
            .node("left", runs.node()).node("left2", runs.node()).node("right", runs.node())
            .node("join", runs.node(lambda ctx: sorted(ctx.input))).node("end", runs.node())
            .edge("s", "left", condition="result.output.go == 'left'")
            .edge("s", "right", condition="result.output.go == 'right'")
            .edge("left", "left2").edge("left2", "join").edge("right", "join")
            .edge("join", "end"))
    bp = flow.to_blueprint()
    expected = await oracle(bp, flow.registry(), {"side": "right"}, run_id="diamond-run")
    runs.reset()
    async with backend.workers([bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {"side": "right"}, run_id="diamond-run")
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.join"] == ["right"]
    assert runs.counts == {"s": 1, "right": 1, "join": 1, "end": 1}
    stored = await worker.create_context(run_id).load()
    assert stored is not None
    records = json.loads(result.serialized_context)
    for data in (stored, records):
        assert data["_flowcraft.node.left"]["skipped"] is True
        assert data["_flowcraft.node.left2"]["skipped"] is True


async def test_loop_and_batch_give_the_in_memory_result(backend: Backend) -> None:
    runs = Executions()

    async def body(ctx: NodeContext) -> Any:
        runs.record(ctx)
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return count

    async def square(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return ctx.input * ctx.input

    flow = (Flow("loop-batch").node("body", body)
            .loop("ctl", start_node_id="body", end_node_id="body", condition="count < 3",
                  max_iterations=10)
            .batch("fan", square, input_key="items", output_key="squares")
            .edge("ctl", "fan"))
    bp = flow.to_blueprint()
    initial = {"items": [1, 2.5, 3]}
    expected = await oracle(bp, flow.registry(), initial, run_id="same-run")
    assert expected.status == "completed", expected.errors
    runs.reset()
    async with backend.workers([bp], flow.registry(), count=2) as (client, _):
        run_id = await client.start_workflow(bp, initial, run_id="same-run")
        result = await client.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert result.context.get("squares") == [1, 6.25, 9], result.serialized_context
    assert result.context["count"] == 3
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts["body"] == 3
    assert sum(n for k, n in runs.counts.items() if k.startswith("fan_scatter_worker")) == 3


async def test_resume_with_action_on_a_wait_node(backend: Backend) -> None:
    runs = Executions()
    flow = (Flow("approval")
            .node("request", runs.node(lambda ctx: {"amount": 120}))
            .wait("approve")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .node("reject", runs.node(lambda ctx: "rejected"))
            .edge("request", "approve")
            .edge("approve", "pay", action="approved")
            .edge("approve", "reject", action="denied"))
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        parked = await worker.wait_for_result(run_id, timeout=20)
        assert parked.status == "awaiting"
        assert parked.context["_awaitingNodeIds"] == ["approve"]
        status = await worker.get_run_status(run_id)
        assert status is not None and status["status"] == "awaiting"
        assert runs.counts == {"request": 1}
        enqueued = await worker.resume_with_action(run_id, "approved", {"by": "ada"})
        assert enqueued == ["approve"]
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.approve"] == {"by": "ada"}
    assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}
    assert "_awaitingNodeIds" not in result.context
    assert runs.counts == {"request": 1, "pay": 1}


# =============================================================================================
# Failures, poison and malformed messages
# =============================================================================================


async def test_failing_node_fails_the_run_naming_the_node(backend: Backend) -> None:
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        raise RuntimeError("card declined (code 42)")

    flow = (Flow("failing").node("s", runs.node()).node("chargeCard", boom, max_retries=2)
            .node("ok", runs.node(delay=0.3))
            .node("d_all", runs.node()).node("e_any", runs.node(), join_strategy="any")
            .edge("s", "chargeCard").edge("s", "ok").edge("chargeCard", "d_all")
            .edge("ok", "d_all").edge("chargeCard", "e_any").edge("ok", "e_any"))
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await backend.wait_queue_empty()
    assert result.status == "failed"
    (error,) = result.errors
    assert error.node_id == "chargeCard" and error.attempt == 2
    assert "card declined (code 42)" in error.message
    assert runs.counts["chargeCard"] == 2  # maxRetries is the number of attempts
    assert runs.counts["d_all"] == 0 and runs.counts["e_any"] == 0
    status = await worker.get_run_status(run_id)
    assert status is not None
    assert status["status"] == "failed" and status["failedNodeId"] == "chargeCard"
    assert "node 'chargeCard' failed" in status["error"] and "card declined" in status["error"]
    # Its successors are marked, so a late job of theirs does not run.
    store = worker.coordination_store
    assert await store.get(poison_key(run_id, "d_all")) == "chargeCard"
    assert await store.get(cancel_key(run_id, "e_any")) == "chargeCard"


async def test_malformed_messages_are_dead_lettered_and_fail_a_named_run(
        backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="flowcraft")
    runs = Executions()
    flow = chain("victim", runs, "a")
    bp = flow.to_blueprint()
    client = backend.worker([bp], flow.registry())
    no_blueprint = await client.start_workflow(bp, {})
    no_node = await client.start_workflow(bp, {})
    assert len(await backend.take_bodies()) == 2  # the runs' own jobs are lost ...
    bodies = ["garbage {", "this is not a job!", " ", json.dumps([1, 2]),
              base64.b64encode(b"\xff\xfe not utf-8").decode(),
              # ... and these name the runs, but are not jobs either.
              json.dumps({"runId": no_blueprint, "nodeId": "a"}),
              json.dumps({"runId": no_node, "blueprintId": "victim"})]
    for body in bodies:
        await backend.send_raw(body)
    async with backend.workers([bp], flow.registry()) as (worker,):
        await backend.wait_queue_empty()
        for run_id, missing in ((no_blueprint, "blueprintId"), (no_node, "nodeId")):
            result = await worker.wait_for_result(run_id, timeout=10)
            assert result.status == "failed"
            status = await worker.get_run_status(run_id)
            assert status is not None
            assert "invalid job message" in status["error"] and missing in status["error"]
        assert runs.counts == {}
        # The worker lives on and runs the next run.
        ok = await worker.start_workflow(bp, {})
        assert (await worker.wait_for_result(ok, timeout=20)).status == "completed"
    assert sorted(await backend.dead_letters()) == sorted(bodies)
    removed = {match.group(1) for record in caplog.records
               if (match := re.search(r"message (\S+) removed", record.getMessage()))}
    assert len(removed) == len(bodies), removed  # each logged with its message id


async def test_unknown_blueprint_fails_the_run_and_dead_letters_the_message(
        backend: Backend) -> None:
    runs = Executions()
    known, other = chain("known", runs, "x"), chain("elsewhere", runs, "x")
    client = backend.worker([other.to_blueprint()], other.registry())
    run_id = await client.start_workflow(other.to_blueprint(), {})
    async with backend.workers([known.to_blueprint()], known.registry(),
                               unknown_blueprint_grace_seconds=0) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await backend.wait_queue_empty()
    assert result.status == "failed" and runs.counts == {}
    status = await client.get_run_status(run_id)
    assert status is not None and "unknown blueprint id 'elsewhere'" in status["error"]
    [dead] = await backend.dead_letters()
    assert backend.job_of(dead) == {"runId": run_id, "blueprintId": "elsewhere", "nodeId": "x"}


# =============================================================================================
# Deliveries: slow nodes, duplicates, stopping workers, durable sleeps
# =============================================================================================


@pytest.mark.parametrize(("lease", "duration"), [(2, 6.0), (0.5, 2.0)],
                         ids=["lease2s-node6s", "fractional-lease"])
async def test_node_outliving_its_message_visibility_runs_once(
        backend: Backend, deliveries: Deliveries, lease: float, duration: float) -> None:
    runs = Executions()
    flow = (Flow("slow").node("slow", logged_node(runs, lambda ctx: "done", delay=duration))
            .node("next", runs.node()).edge("slow", "next"))
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry(), count=2, lease_seconds=lease) as pool:
        run_id = await pool[0].start_workflow(bp, {})
        result = await pool[0].wait_for_result(run_id, timeout=30)
        await backend.wait_queue_empty()
    assert result.status == "completed", result.errors
    assert runs.counts == {"slow": 1, "next": 1}
    # The message stayed invisible all along: no worker received it a second time.
    assert deliveries.counts("slow") == {1}


async def test_duplicate_deliveries_run_each_node_once(backend: Backend) -> None:
    runs = Executions()
    # camelCase ids: the local Cosmos server lower-cases conditions.
    flow = chain("dupes", runs, "chargeCard", "shipOrder", "notifyUser")
    bp = flow.to_blueprint()
    client = backend.worker([bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    [start] = await backend.peek_bodies()
    for _ in range(2):  # the same job, delivered three times
        await backend.send_raw(start)
    assert await backend.message_count() == 3
    async with backend.workers([bp], flow.registry(), count=2, lease_seconds=2) as (worker, _):
        result = await worker.wait_for_result(run_id, timeout=20)
        await backend.wait_queue_empty(timeout=20)
        assert result.status == "completed"
        assert runs.counts == {"chargeCard": 1, "shipOrder": 1, "notifyUser": 1}
        # Late copies of a finished middle job change nothing, handled or queued.
        late = JobPayload(run_id, "dupes", "shipOrder")
        assert await worker.handle_job(late) == "duplicate"
        await backend.send_raw(late.to_json())
        await asyncio.sleep(0.5)
        await backend.wait_queue_empty()
    assert runs.counts == {"chargeCard": 1, "shipOrder": 1, "notifyUser": 1}
    assert (await client.wait_for_result(run_id, timeout=1)).context == result.context


@pytest.mark.parametrize("graceful", [True, False], ids=["finish", "cancel"])
async def test_stop_mid_run_loses_nothing(backend: Backend, deliveries: Deliveries,
                                          graceful: bool) -> None:
    """``stop()`` while a slow node runs. Gracefully (enough time) the node finishes and each
    node runs once; with a short timeout the slow node is cancelled, its lease released and
    its message made visible again at once, so a second worker runs it to completion well
    before the lease would have ended, and its effect lands once."""
    runs = Executions()
    started = asyncio.Event()
    lease = 10

    async def slow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        await asyncio.sleep(2.0)
        return "slow-done"

    flow = (Flow("stoppable").node("a", runs.node()).node("slow", slow)
            .node("z", runs.node()).edge("a", "slow").edge("slow", "z"))
    bp = flow.to_blueprint()
    first = backend.worker([bp], flow.registry(), lease_seconds=lease, worker_id="first")
    await first.start()
    backend.started.append(first)
    run_id = await first.start_workflow(bp, {})
    await asyncio.wait_for(started.wait(), 10)
    stopping = time.monotonic()
    await first.stop(timeout_seconds=10 if graceful else 0.2)
    if graceful:
        assert runs.counts == {"a": 1, "slow": 1, "z": 1}
    async with backend.workers([bp], flow.registry(), lease_seconds=lease,
                               worker_id="second") as (second,):
        result = await second.wait_for_result(run_id, timeout=20)
        finished = time.monotonic() - stopping
        await backend.wait_queue_empty()
    assert result.status == "completed", result.errors
    assert runs.counts["a"] == 1 and runs.counts["z"] == 1
    assert runs.counts["slow"] == (1 if graceful else 2)
    assert result.context["_outputs.slow"] == "slow-done"
    if not graceful:
        # Released, not left to time out: done well before the lease would have ended.
        assert finished < lease - 1, finished
        # The job that was interrupted (a's, continued locally to "slow") came back to the
        # second worker as its second delivery.
        assert ("a", 2, "second-1") in deliveries.seen, deliveries.seen


async def test_durable_sleep_frees_the_worker(backend: Backend) -> None:
    runs = Executions()
    stamps: dict[str, float] = {}

    def stamp(name: str) -> Any:
        def compute(ctx: NodeContext) -> Any:
            stamps[name] = time.monotonic()
            return name
        return compute

    sleepy = (Flow("sleepy").node("before", runs.node(stamp("before"))).sleep("nap", "3s")
              .node("after", runs.node(stamp("after"))).edge("before", "nap")
              .edge("nap", "after"))
    quick = chain("quick", runs, "q1", "q2")
    bps = [sleepy.to_blueprint(), quick.to_blueprint()]
    registry = {**sleepy.registry(), **quick.registry()}
    async with backend.workers(bps, registry, concurrency=1) as (worker,):
        sleeping = await worker.start_workflow(bps[0], {})
        context = worker.create_context(sleeping)

        async def napped() -> bool:
            return await context.has("_outputs.nap")

        await azure_helpers.wait_for(napped, timeout=10)
        record = await context.get("_flowcraft.node.nap")
        assert record["wakeUpAt"] - time.time() > 1.5

        async def one_message() -> bool:
            return await backend.message_count() == 1

        # Once the job that ran "before" and "nap" is acknowledged (its successor was sent
        # before; deletes may be gathered for a moment), one message is left in the queue,
        # and it is not visible: "after" waits out its delay.
        await azure_helpers.wait_for(one_message, timeout=2, interval=0.05)
        await asyncio.sleep(0.6)
        assert await backend.message_count() == 1
        assert await backend.peek_bodies() == []
        # The worker (concurrency 1) is not held by the sleep: another run goes through.
        other = await worker.start_workflow(bps[1], {})
        assert (await worker.wait_for_result(other, timeout=2.5)).status == "completed"
        assert runs.counts["after"] == 0
        result = await worker.wait_for_result(sleeping, timeout=20)
    assert result.status == "completed", result.errors
    waited = stamps["after"] - stamps["before"]
    assert 2.5 <= waited < 8, waited
    assert runs.counts == {"before": 1, "after": 1, "q1": 1, "q2": 1}


# =============================================================================================
# Item size limits
# =============================================================================================


async def test_a_context_over_the_item_limit_starts_nothing(limited_backend: Backend) -> None:
    backend = limited_backend
    assert backend.limit_bytes is not None
    flow = Flow("big-start").node("a", lambda ctx: 1)
    bp = flow.to_blueprint()
    client = backend.worker([bp], flow.registry())
    with pytest.raises(ContextTooLargeError, match=r"too-big-run.* \d+ bytes"):
        await client.start_workflow(bp, {"blob": "y" * (backend.limit_bytes + 1000)},
                                    run_id="too-big-run")
    assert await client.create_context("too-big-run").load() is None
    assert await client.get_run_status("too-big-run") is None
    assert await backend.message_count() == 0


async def test_node_output_over_the_item_limit_fails_the_run_clearly(
        limited_backend: Backend) -> None:
    backend = limited_backend
    assert backend.limit_bytes is not None and backend.service is not None
    limit = backend.limit_bytes
    runs = Executions()
    flow = (Flow("big-output")
            .node("small", runs.node(lambda ctx: "fine"))
            .node("huge", runs.node(lambda ctx: "h" * (limit + 1000)))
            .node("after", runs.node())
            .edge("small", "huge").edge("huge", "after"))
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry(), lease_seconds=2,
                               max_receive_count=3) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=25)
    assert result.status == "failed"
    assert runs.counts["after"] == 0
    assert runs.counts["huge"] == 1  # failed once, clearly: not retried until poisoned
    assert result.errors and result.errors[0].node_id == "huge"
    message = result.errors[0].message
    assert run_id in message and "bytes" in message and backend.service in message
    status = await worker.get_run_status(run_id)
    assert status is not None and status["status"] == "failed" and run_id in status["error"]
    # Nothing was truncated into the context: the output is simply absent.
    assert "_outputs.huge" not in result.context
    assert result.context["_outputs.small"] == "fine"


# =============================================================================================
# Reconciling
# =============================================================================================


async def test_reconciler_resumes_a_run_whose_messages_were_lost(backend: Backend) -> None:
    runs = Executions()
    flow = chain("lost", runs, "a", "b")
    bp = flow.to_blueprint()
    client = backend.worker([bp], flow.registry())
    run_id = await client.start_workflow(bp, {"order": 7})
    assert len(await backend.take_bodies()) == 1  # the start message is lost
    patient = await backend.reconciler(client, 3600).run()
    assert (patient.stalled_runs, patient.reconciled_runs) == (0, 0)
    assert patient.scanned_items == (0 if backend.lists_only_stalled else 1)
    reconciler = backend.reconciler(client, 0)
    stats = await reconciler.run()
    assert (stats.scanned_items, stats.stalled_runs, stats.reconciled_runs,
            stats.failed_runs) == (1, 1, 1, 0)
    assert [backend.job_of(body) for body in await backend.peek_bodies()] == [
        {"runId": run_id, "blueprintId": "lost", "nodeId": "a"}]
    async with backend.workers([bp], flow.registry()):
        result = await client.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"a": 1, "b": 1}
    stats = await reconciler.run()  # a completed run is not running: left alone
    assert (stats.scanned_items, stats.stalled_runs) == (0, 0)


async def test_reconciler_needs_no_node_implementations(backend: Backend) -> None:
    """A reconciler (a cron job, ``flowcraft reconcile``) has the blueprints but need not
    import the nodes' code: it runs no node."""
    runs = Executions()
    flow = chain("no-code", runs, "a", "b")
    bp = flow.to_blueprint()
    reconciling = backend.worker([bp], {})
    run_id = await reconciling.start_workflow(bp, {})
    await backend.take_bodies()  # the start job is lost
    stats = await backend.reconciler(reconciling, 0).run()
    assert (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs) == (1, 1, 0)
    assert [backend.job_of(body) for body in await backend.take_bodies()] == [
        {"runId": run_id, "blueprintId": "no-code", "nodeId": "a"}]


async def test_reconcile_does_not_enqueue_a_node_that_is_running(backend: Backend) -> None:
    runs = Executions()
    release = asyncio.Event()

    async def held(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        return NodeResult(output="held")

    flow = Flow("held").node("held", held)
    bp = flow.to_blueprint()
    async with backend.workers([bp], flow.registry(), lease_seconds=2) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        await azure_helpers.wait_for(lambda: runs.counts["held"] == 1, timeout=10)
        stats = await backend.reconciler(worker, 0).run()
        assert (stats.stalled_runs, stats.reconciled_runs) == (1, 1)
        assert await worker.reconcile(run_id) == []  # leased: not re-enqueued
        assert await backend.message_count() == 1  # only the running job's own message
        release.set()
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"held": 1}


# =============================================================================================
# The key components
# =============================================================================================


async def test_key_components_are_exported_and_fit_the_protocols(backend: Backend) -> None:
    module, names = backend.exports()
    assert names <= set(module.__all__)
    bp = WorkflowBlueprint.model_validate({"id": "k", "nodes": [{"id": "a", "uses": "a"}],
                                           "edges": []})
    adapter = backend.worker([bp], {"a": lambda ctx: 1})
    assert isinstance(adapter, BaseDistributedAdapter)
    assert isinstance(adapter.create_context("r"), AsyncContext)
    assert isinstance(adapter.coordination_store, CoordinationStore)
    assert isinstance(backend.reconciler(adapter, 300), Reconciler)
