"""Workers trust nothing a job message says that the run's stored state does not confirm.

Every test runs on the in-process backend, on AWS (moto: SQS + DynamoDB) and on Azure
(Azurite + the Cosmos DB server + Redis): a reused run id, errors that only show after
a node ran (a condition that cannot be evaluated, a value that cannot be stored),
forged jobs (another blueprint, a later iteration, an unknown node), garbage naming a run
that never existed, a cycle without an exit, a blueprint missing during a rolling deploy,
poison counted by attempts rather than receives, and a commit whose answer was lost.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from distributed_helpers import Executions
from flowcraft import FlowRuntime, NodeContext, WorkflowBlueprint
from flowcraft.context import PatchOperation
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.distributed.context import (
    BLUEPRINT_KEY,
    InMemoryRunStore,
)
from flowcraft.distributed.coordination import InMemoryCoordinationStore
from flowcraft.distributed.inprocess import InProcessAdapter, InProcessQueue
from flowcraft.distributed.job import JobPayload
from flowcraft.errors import InvalidContextError, RunAlreadyExistsError

Make = Callable[..., BaseDistributedAdapter]


@dataclass
class Backend:
    """One backend's workers on shared resources, and a way to see its queue."""

    name: str
    make: Make
    """``make(blueprints, registry, **adapter_options)``: a worker (not started)."""
    send_raw: Callable[[str], Awaitable[None]]
    queue_empty: Callable[[], Awaitable[bool]]


def _in_process() -> Backend:
    queue, store = InProcessQueue(), InMemoryRunStore()
    statuses: dict[str, dict[str, Any]] = {}
    coordination = InMemoryCoordinationStore()

    def make(blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
             runtime: FlowRuntime | None = None, **options: Any) -> BaseDistributedAdapter:
        runtime = runtime or FlowRuntime(blueprints={b.id: b for b in blueprints},
                                         registry=dict(registry))
        return InProcessAdapter(runtime.options, coordination, queue=queue, store=store,
                                statuses=statuses, **{"poll_wait_seconds": 0.05,
                                                      "lease_seconds": 3,
                                                      "status_touch_seconds": 0, **options})

    async def send_raw(body: str) -> None:
        await queue.send([body])

    async def queue_empty() -> bool:
        return len(queue) == 0

    return Backend("in-process", make, send_raw, queue_empty)


def _aws(request: pytest.FixtureRequest) -> Backend:
    import aws_helpers

    aws_helpers.make_moto_dynamodb_atomic(request.getfixturevalue("monkeypatch"))
    aws = request.getfixturevalue("aws")

    def make(blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
             runtime: FlowRuntime | None = None, **options: Any) -> BaseDistributedAdapter:
        adapter = aws_helpers.make_adapter(aws, blueprints, registry, **options)
        if runtime is not None:
            adapter.runtime_options = runtime.options
            adapter.engine = type(adapter.engine)(runtime.options)
        return adapter

    async def send_raw(body: str) -> None:
        await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=body)

    async def queue_empty() -> bool:
        return not any((await aws_helpers.queue_counts(aws.sqs, aws.queue_url)).values())

    return Backend("aws", make, send_raw, queue_empty)


def _azure(request: pytest.FixtureRequest) -> Backend:
    import azure_helpers

    azure = request.getfixturevalue("azure")

    def make(blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any],
             runtime: FlowRuntime | None = None, **options: Any) -> BaseDistributedAdapter:
        adapter = azure_helpers.make_adapter(azure, blueprints, registry, **options)
        if runtime is not None:
            adapter.runtime_options = runtime.options
            adapter.engine = type(adapter.engine)(runtime.options)
        return adapter

    async def send_raw(body: str) -> None:
        await azure.queue.send_message(body)

    async def queue_empty() -> bool:
        return await azure_helpers.message_count(azure.queue) == 0

    return Backend("azure", make, send_raw, queue_empty)


@pytest.fixture(params=["in-process", "aws", "azure"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "aws":
        return _aws(request)
    if request.param == "azure":
        return _azure(request)
    return _in_process()


# -- helpers -----------------------------------------------------------------------------------


def blueprint(bp_id: str, nodes: list[str], edges: list[tuple[str, str]], *,
              conditions: Mapping[tuple[str, str], str] | None = None,
              uses: Mapping[str, str] | None = None) -> WorkflowBlueprint:
    conditions = conditions or {}
    uses = uses or {}
    return WorkflowBlueprint.model_validate({
        "id": bp_id,
        "nodes": [{"id": n, "uses": uses.get(n, "step")} for n in nodes],
        "edges": [{"source": s, "target": t,
                   **({"condition": conditions[(s, t)]} if (s, t) in conditions else {})}
                  for s, t in edges],
    })


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0,
                what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(0.05)


async def settle(backend: Backend, *workers: BaseDistributedAdapter,
                 timeout: float = 20.0) -> None:
    """The queue is empty and no worker runs a job."""
    async def calm() -> bool:
        return all(not w.worker_loop.jobs for w in workers) and await backend.queue_empty()

    await until(calm, timeout, "an empty queue")
    await asyncio.sleep(0.3)
    await until(calm, timeout, "an empty queue")


class Workers:
    """Started workers, stopped on exit."""

    def __init__(self, *workers: BaseDistributedAdapter) -> None:
        self.workers = workers

    async def __aenter__(self) -> tuple[BaseDistributedAdapter, ...]:
        for worker in self.workers:
            await worker.start()
        return self.workers

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            await worker.stop(timeout_seconds=5)


CHAIN = blueprint("chain", ["s", "t", "u"], [("s", "t"), ("t", "u")])
OTHER = blueprint("other", ["x", "y"], [("x", "y")])


# -- 1. a reused run id ------------------------------------------------------------------------


async def test_reused_run_id_is_refused_and_the_existing_run_is_untouched(
        backend: Backend) -> None:
    runs = Executions()
    worker = backend.make([CHAIN], {"step": runs.node()})
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {"order": 1}, run_id="taken")
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        assert result.status == "completed"
        before = (await worker.create_context(run_id).load(), await worker.get_run_status(run_id))
        with pytest.raises(RunAlreadyExistsError, match="'taken' already exists"):
            await worker.start_workflow(CHAIN, {"order": 2}, run_id="taken")
        await settle(backend, worker)
        after = (await worker.create_context(run_id).load(), await worker.get_run_status(run_id))
    assert after == before
    assert runs.counts == {"s": 1, "t": 1, "u": 1}  # nothing ran again


async def test_reused_id_of_a_running_run_is_refused_too(backend: Backend) -> None:
    client = backend.make([CHAIN], {"step": Executions().node()})
    await client.start_workflow(CHAIN, {"order": 1}, run_id="busy")  # no worker: running
    status = await client.get_run_status("busy")
    with pytest.raises(RunAlreadyExistsError):
        await client.start_workflow(CHAIN, {"order": 2}, run_id="busy")
    assert (await client.create_context("busy").load() or {})["order"] == 1
    assert await client.get_run_status("busy") == status


async def test_invalid_initial_context_starts_nothing(backend: Backend) -> None:
    client = backend.make([CHAIN], {"step": Executions().node()})
    with pytest.raises(InvalidContextError, match=r"_outputs\.s"):
        await client.start_workflow(CHAIN, {"_outputs.s": "planted"}, run_id="planted")
    assert await client.create_context("planted").load() is None
    assert await client.get_run_status("planted") is None
    assert await backend.queue_empty()


# -- 2. errors after the node ran --------------------------------------------------------------


async def test_condition_that_cannot_be_evaluated_fails_the_node_once(backend: Backend) -> None:
    runs = Executions()
    bp = blueprint("cond", ["s", "t"], [("s", "t")],
                   conditions={("s", "t"): "result.output / 0 > 1"})
    registry = {"step": runs.node(lambda ctx: 5)}
    expected = await FlowRuntime(blueprints={bp.id: bp}, registry=registry).run(
        bp, {}, run_id="cond-run")
    runs.reset()
    worker = backend.make([bp], registry, lease_seconds=1, max_receive_count=3)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {}, run_id="cond-run")
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        await settle(backend, worker)
    assert result.status == expected.status == "failed"
    assert runs.counts == {"s": 1}  # failed once, not retried until poison
    status = await worker.get_run_status(run_id)
    assert status["failedNodeId"] == "s"
    assert "node 's' failed" in status["error"] and "division by zero" in status["error"]
    assert "poison" not in status["error"]
    assert result.errors[0].message == expected.errors[0].message


async def test_a_failed_node_keeps_its_error_type_message_and_traceback(
        backend: Backend) -> None:
    def charge(ctx: NodeContext) -> Any:
        raise PermissionError("card declined by the issuer")

    bp = blueprint("declined", ["s", "t"], [("s", "t")])
    expected = await FlowRuntime(blueprints={bp.id: bp}, registry={"step": charge}).run(bp, {})
    assert expected.errors[0].traceback and "card declined" in expected.errors[0].traceback
    assert "in charge" in expected.errors[0].traceback
    worker = backend.make([bp], {"step": charge}, lease_seconds=1, max_receive_count=3)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {}, run_id="declined-run")
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        await settle(backend, worker)
    assert result.status == "failed"
    [error] = result.errors
    assert (error.node_id, error.error_type) == ("s", "PermissionError")
    assert "card declined by the issuer" in error.message
    assert error.traceback is not None and "in charge" in error.traceback
    status = await worker.get_run_status(run_id)
    assert status["error"].startswith("node 's' failed")
    failure = status["failure"]
    assert failure["errorType"] == "PermissionError" and failure["nodeId"] == "s"
    assert "in charge" in failure["traceback"]
    assert len(json.dumps(failure).encode()) <= 4096 + 200
    record = (await worker.create_context(run_id).load() or {})["_flowcraft.node.s"]
    assert record["failed"] and record["errorType"] == "PermissionError"
    assert "in charge" in record["traceback"]


@pytest.mark.parametrize("value", [math.nan, Decimal("1.5"), b"raw"],
                         ids=["nan", "decimal", "bytes"])
async def test_output_that_cannot_be_stored_fails_the_node_once(backend: Backend,
                                                                 value: Any) -> None:
    runs = Executions()
    bp = blueprint("unstorable", ["s", "t"], [("s", "t")])
    worker = backend.make([bp], {"step": runs.node(lambda ctx: {"value": value})},
                          lease_seconds=1, max_receive_count=3)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        await settle(backend, worker)
    assert result.status == "failed"
    assert runs.counts == {"s": 1}
    status = await worker.get_run_status(run_id)
    assert status["failedNodeId"] == "s"
    assert "output of node 's' cannot be stored" in status["error"]
    assert "poison" not in status["error"]


async def test_context_write_that_cannot_be_stored_fails_the_node_once(backend: Backend) -> None:
    runs = Executions()

    async def writes_nan(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await ctx.context.set("score", math.inf)
        return "ok"

    bp = blueprint("unstorable-write", ["s", "t"], [("s", "t")])
    worker = backend.make([bp], {"step": writes_nan}, lease_seconds=1, max_receive_count=3)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        await settle(backend, worker)
    assert result.status == "failed" and runs.counts == {"s": 1}
    status = await worker.get_run_status(run_id)
    assert status["failedNodeId"] == "s" and "'score'" in status["error"]


async def test_failing_node_with_an_unstorable_write_fails_once_with_its_own_error(
        backend: Backend) -> None:
    runs = Executions()

    async def fails(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await ctx.context.set("score", math.inf)
        raise RuntimeError("card declined")

    bp = blueprint("fails-dirty", ["s", "t"], [("s", "t")])
    worker = backend.make([bp], {"step": fails}, lease_seconds=1, max_receive_count=3)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
        await settle(backend, worker)
        stored = await worker.create_context(run_id).load()
    assert result.status == "failed" and runs.counts == {"s": 1}
    assert "card declined" in (await worker.get_run_status(run_id))["error"]
    assert "score" not in stored  # the failure is recorded without the write it cannot hold


# -- 3. forged jobs ----------------------------------------------------------------------------


async def test_job_naming_another_blueprint_does_not_run_inside_the_run(backend: Backend) -> None:
    runs = Executions()
    worker = backend.make([CHAIN, OTHER], {"step": runs.node()})
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {}, run_id="mine")
        assert (await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
                ).status == "completed"
        before = await worker.create_context(run_id).load()
        await worker.backend.queue.send([JobPayload(run_id, "other", "x")])
        await settle(backend, worker)
        after = await worker.create_context(run_id).load()
        status = await worker.get_run_status(run_id)
    assert runs.counts == {"s": 1, "t": 1, "u": 1}  # other's x never ran
    assert after == before
    assert status["status"] == "completed"


async def test_run_without_a_stored_blueprint_adopts_its_first_jobs(backend: Backend) -> None:
    """What the TypeScript library's client writes: no blueprint id but in its jobs."""
    runs = Executions()
    worker = backend.make([CHAIN, OTHER], {"step": runs.node()})
    client = backend.make([CHAIN, OTHER], {"step": runs.node()})
    await client.create_context("ts-run").create({"input": 1})
    await client.backend.statuses.write("ts-run", {"status": "running", "lastUpdated": 0},
                                        only_if_running=False)
    await client.backend.queue.send([JobPayload("ts-run", "chain", "s")])
    async with Workers(worker):
        result = await worker.wait_for_result("ts-run", timeout=20, poll_interval=0.05)
        assert result.status == "completed"
        assert (await worker.create_context("ts-run").load())[BLUEPRINT_KEY] == "chain"
        await worker.backend.queue.send([JobPayload("ts-run", "other", "x")])
        await settle(backend, worker)
    assert runs.counts == {"s": 1, "t": 1, "u": 1}


@pytest.mark.parametrize("node_id, iteration", [("s", 1), ("t", 1), ("u", 7), ("s", 0)])
async def test_forged_iteration_does_not_rerun_a_finished_node(backend: Backend, node_id: str,
                                                               iteration: int) -> None:
    runs = Executions()
    worker = backend.make([CHAIN], {"step": runs.node()})
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {})
        assert (await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
                ).status == "completed"
        before = await worker.create_context(run_id).load()
        await worker.backend.queue.send([JobPayload(run_id, "chain", node_id, iteration)])
        await settle(backend, worker)
        after = await worker.create_context(run_id).load()
    assert runs.counts == {"s": 1, "t": 1, "u": 1}
    assert after == before  # a refused job leaves nothing behind
    assert (await worker.get_run_status(run_id))["status"] == "completed"


async def test_unknown_node_is_dropped_and_the_run_goes_on(backend: Backend) -> None:
    runs = Executions()
    gate = asyncio.Event()

    async def slow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        if ctx.node_id == "t":
            await gate.wait()
        return ctx.node_id

    worker = backend.make([CHAIN], {"step": slow}, concurrency=4)
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {})
        await until(lambda: _true(runs.counts["t"] == 1), what="t running")
        await worker.backend.queue.send([JobPayload(run_id, "chain", "no-such-node")])
        await asyncio.sleep(1.5)  # the forged job is handled while the run is running
        assert (await worker.get_run_status(run_id))["status"] == "running"
        gate.set()
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1, "u": 1}


async def _true(value: bool) -> bool:
    return value


# -- 8. garbage naming a run that never existed -------------------------------------------------


async def test_garbage_naming_an_unknown_run_creates_no_status_record(backend: Backend) -> None:
    worker = backend.make([CHAIN], {"step": Executions().node()})
    await backend.send_raw(JobPayload("ghost-1", "chain", "s").to_json())
    await backend.send_raw(JobPayload("ghost-2", "no-such-blueprint", "s").to_json())
    await backend.send_raw(json.dumps({"runId": "ghost-3", "nodeId": "s"}))
    async with Workers(worker):
        await settle(backend, worker)
    for run_id in ("ghost-1", "ghost-2", "ghost-3"):
        assert await worker.get_run_status(run_id) is None, run_id


# -- 4. a cycle without an exit ----------------------------------------------------------------


async def test_cycle_without_an_exit_stops_at_the_in_memory_limit(backend: Backend) -> None:
    runs = Executions()
    bp = blueprint("endless", ["s", "a", "b"], [("s", "a"), ("a", "b"), ("b", "a")])
    registry = {"step": runs.node(lambda ctx: ctx.node_id)}
    runtime = FlowRuntime(blueprints={bp.id: bp}, registry=registry, max_node_iterations=12)
    expected = await runtime.run(bp, {}, run_id="endless-run")
    runs.reset()
    worker = backend.make([bp], registry, runtime=runtime)
    async with Workers(worker):
        run_id = await worker.start_workflow(bp, {}, run_id="endless-run")
        result = await worker.wait_for_result(run_id, timeout=60, poll_interval=0.05)
    assert expected.status == result.status == "failed"
    assert result.errors[0].message == expected.errors[0].message
    assert "limit of max_node_iterations" in (await worker.get_run_status(run_id))["error"]
    assert runs.counts["a"] == 12


# -- 5. a rolling deploy -----------------------------------------------------------------------


async def test_blueprint_missing_on_a_worker_waits_for_one_that_has_it(backend: Backend) -> None:
    runs = Executions()
    old = backend.make([OTHER], {"step": runs.node()}, max_receive_count=2)
    old.max_delay_seconds = 1  # the refused job comes back quickly in this test
    client = backend.make([CHAIN], {"step": runs.node()})
    async with Workers(old):
        run_id = await client.start_workflow(CHAIN, {})
        await asyncio.sleep(4)  # the old worker sees the job several times
        assert (await client.get_run_status(run_id))["status"] == "running"
        assert runs.counts == {}
        async with Workers(backend.make([CHAIN], {"step": runs.node()})) as (new,):
            result = await new.wait_for_result(run_id, timeout=30, poll_interval=0.05)
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1, "u": 1}


async def test_blueprint_missing_past_the_grace_period_fails_the_run(backend: Backend) -> None:
    old = backend.make([OTHER], {"step": Executions().node()},
                       unknown_blueprint_grace_seconds=1.5)
    old.max_delay_seconds = 1
    client = backend.make([CHAIN], {"step": Executions().node()})
    async with Workers(old):
        started = time.monotonic()
        run_id = await client.start_workflow(CHAIN, {})
        result = await client.wait_for_result(run_id, timeout=30, poll_interval=0.05)
        await settle(backend, old)
    assert time.monotonic() - started >= 1.5
    assert result.status == "failed"
    error = (await client.get_run_status(run_id))["error"]
    assert "unknown blueprint id 'chain'" in error and "within 1.5s" in error


# -- 6. poison is counted in attempts ------------------------------------------------------------


async def test_receives_without_an_attempt_do_not_make_a_job_poison(backend: Backend) -> None:
    runs = Executions()
    client = backend.make([CHAIN], {"step": runs.node()}, lease_seconds=1)
    run_id = await client.start_workflow(CHAIN, {})
    for _ in range(4):  # four workers took the message and died before they claimed it
        (message,) = await client.backend.queue.receive(1, 2)
        await client.backend.queue.set_visibility(message, 0)
    worker = backend.make([CHAIN], {"step": runs.node()}, max_receive_count=2)
    async with Workers(worker):
        result = await worker.wait_for_result(run_id, timeout=30, poll_interval=0.05)
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1, "u": 1}


async def test_a_message_past_the_hard_receive_limit_is_still_removed(backend: Backend) -> None:
    runs = Executions()
    client = backend.make([CHAIN], {"step": runs.node()}, lease_seconds=1)
    run_id = await client.start_workflow(CHAIN, {})
    for _ in range(3):
        (message,) = await client.backend.queue.receive(1, 2)
        await client.backend.queue.set_visibility(message, 0)
    worker = backend.make([CHAIN], {"step": runs.node()}, max_receive_count=1,
                          hard_receive_limit=3)
    async with Workers(worker):
        result = await worker.wait_for_result(run_id, timeout=30, poll_interval=0.05)
    assert result.status == "failed" and runs.counts == {}
    assert "received 4 times (hard limit 3)" in (await worker.get_run_status(run_id))["error"]


# -- 7. a commit whose answer was lost -----------------------------------------------------------


class ContextsFrom:
    """A run store (for one worker) whose contexts ``context(run_id)`` makes."""

    def __init__(self, context: Callable[[str], Any]) -> None:
        self.context = context


class LostAnswer(Exception):
    """What a timeout or an HTTP 500 after the write applied looks like to the worker."""


def lose_commit_answers(worker: BaseDistributedAdapter, node_id: str, mode: str) -> list[str]:
    """Make the first commit of ``node_id`` apply, then fail: raise (``"raise"``) or report
    a failed condition (``"condition"``: an SDK retry of a write that had landed)."""
    lost: list[str] = []
    create_context = worker.backend.runs.context

    def patched(run_id: str) -> Any:
        context = create_context(run_id)
        commit = context.commit

        async def commit_then_lose(node: str, *args: Any, **kwargs: Any) -> Any:
            committed = await commit(node, *args, **kwargs)
            if node != node_id or lost or committed is None:
                return committed
            lost.append(node)
            if mode == "raise":
                raise LostAnswer(f"the answer to the commit of {node} was lost")
            return None

        context.commit = commit_then_lose
        return context

    worker.backend.runs = ContextsFrom(patched)
    return lost


@pytest.mark.parametrize("mode", ["raise", "condition"])
@pytest.mark.parametrize("node_id", ["s", "t"])
async def test_commit_whose_answer_was_lost_carries_on(backend: Backend, mode: str,
                                                       node_id: str) -> None:
    runs = Executions()
    # A long lease: a redelivery, or a reconcile after it, would take far longer than the run.
    worker = backend.make([CHAIN], {"step": runs.node()}, lease_seconds=60)
    lost = lose_commit_answers(worker, node_id, mode)
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {"in": 1})
        result = await worker.wait_for_result(run_id, timeout=15, poll_interval=0.05)
    assert lost == [node_id]
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1, "u": 1}
    assert result.context["_outputs.u"] == {"node": "u", "input": {"node": "t", "input": {
        "node": "s", "input": None}}}


async def test_commit_refused_for_a_lost_lease_still_discards_the_result() -> None:
    """Reading back tells a lost answer from a lost lease: another owner's record is not ours."""
    runs = Executions()
    backend = _in_process()
    worker = backend.make([CHAIN], {"step": runs.node()})
    create_context = worker.backend.runs.context

    def stolen(run_id: str) -> Any:
        context = create_context(run_id)
        commit = context.commit

        async def commit_after_takeover(node: str, iteration: int, owner: str, *args: Any,
                                        **kwargs: Any) -> Any:
            if node == "t" and runs.counts["t"] == 1:
                # Another worker took the node over and committed it meanwhile.
                await commit(node, iteration, owner, [PatchOperation(
                    "set", "_flowcraft.node.t", {"n": 1, "taken": [0], "by": "someone-else"}),
                    PatchOperation("set", "_outputs.t", "theirs")], **kwargs)
                return None
            return await commit(node, iteration, owner, *args, **kwargs)

        context.commit = commit_after_takeover
        return context

    worker.backend.runs = ContextsFrom(stolen)
    async with Workers(worker):
        run_id = await worker.start_workflow(CHAIN, {})
        await settle(backend, worker)
        data = await create_context(run_id).load()
    assert data["_outputs.t"] == "theirs"  # ours was discarded, not written over theirs
    assert "_outputs.u" not in data  # and ours did not go on as if it had committed


# -- the fit rule, without services ------------------------------------------------------------


def test_job_misfit_rule() -> None:
    from flowcraft.core.graph import Graph
    from flowcraft.core.routing import completed_record, record_key
    from flowcraft.distributed.adapter import job_misfit

    graph = Graph(blueprint("loop", ["s", "a", "b"], [("s", "a"), ("a", "b"), ("b", "a")]))
    fresh: dict[str, Any] = {}
    assert job_misfit(graph, fresh, JobPayload("r", "loop", "s")) is None
    assert "ahead" in (job_misfit(graph, fresh, JobPayload("r", "loop", "s", 1)) or "")
    assert "not in blueprint" in (job_misfit(graph, fresh, JobPayload("r", "loop", "z")) or "")
    ran = {record_key("s"): completed_record(0, [0], None),
           record_key("a"): completed_record(0, [0], None)}
    # s is in no loop: once resolved, no job runs it again.
    assert "resolved already" in (job_misfit(graph, ran, JobPayload("r", "loop", "s", 1)) or "")
    # a is in a cycle: its next generation is a legitimate job, the one after is not.
    assert job_misfit(graph, ran, JobPayload("r", "loop", "a", 1)) is None
    assert "ahead" in (job_misfit(graph, ran, JobPayload("r", "loop", "a", 2)) or "")
