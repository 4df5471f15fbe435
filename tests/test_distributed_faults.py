"""Faults in the distributed job algorithm: a worker crashing at each step, a worker killed
mid-job, lost messages and ``reconcile``, idempotency keys, malformed and poison messages."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import pytest

from distributed_helpers import (
    BEFORE_COMMIT,
    STEPS,
    Cluster,
    CrashPlan,
    Executions,
    comparable,
    drive,
    oracle,
)
from flowcraft import ContextTooLargeError, FlowcraftError, NodeContext, WorkflowBlueprint
from flowcraft.distributed.context import InMemoryDistributedContext, InMemoryRunStore
from flowcraft.distributed.job import JobPayload


def blueprint(bp_id: str, nodes: list[tuple[str, str]], edges: list[tuple[str, str]],
              **node_config: dict[str, Any]) -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": bp_id,
        "nodes": [{"id": i, "uses": u, **({"config": node_config[i]} if i in node_config else {})}
                  for i, u in nodes],
        "edges": [{"source": s, "target": t} for s, t in edges],
    })


# s -> {p, q}; p, q -> j (all join); j -> k -> m (a chain).
# With local continuation, p runs in s's job, q in a job slot s's job is lent (or from a
# queue message when no slot is free), j from a queue message or in p's or q's job, and k
# and m run in j's job (k claimed by j's commit, m by k's).
SHAPE = blueprint(
    "shape",
    [("s", "step"), ("p", "step"), ("q", "step"), ("j", "join"), ("k", "step"), ("m", "step")],
    [("s", "p"), ("s", "q"), ("p", "j"), ("q", "j"), ("j", "k"), ("k", "m")],
)


def shape_registry(runs: Executions) -> dict[str, Any]:
    return {
        "step": runs.node(lambda ctx: [ctx.node_id, ctx.input]),
        "join": runs.node(lambda ctx: sorted(ctx.input)),
    }


# Every crash is recovered by the redelivery of the message that was being processed. A
# crash in a continuation after its commit (or after its enqueue) leaves the next node of
# the chain leased with no message: the redelivered job re-announces the successors of
# every node its execution committed, once that lease has run out.


@pytest.mark.parametrize("node", ["q", "j", "k"])
@pytest.mark.parametrize("step", STEPS)
async def test_crash_at_each_step_recovers_to_the_in_memory_result(step: str, node: str) -> None:
    runs = Executions()
    registry = shape_registry(runs)
    expected = await oracle(SHAPE, registry, {"in": 1}, run_id="crash-run")
    runs.reset()
    plan = CrashPlan().add(step, node)
    async with Cluster([SHAPE], registry, workers=2, lease_seconds=0.5,
                       crash_plan=plan) as cluster:
        run_id = await cluster.client.start_workflow(SHAPE, {"in": 1}, run_id="crash-run")
        await cluster.settle(timeout=10, quiet=0.15)  # a crashed job stays queued: redelivered
        assert plan.fired == [(step, node)]
        assert cluster.status(run_id) == "completed"
        result = await cluster.client.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    reran = 2 if step in {"after_run", "before_commit"} else 1
    assert runs.counts == {n: (reran if n == node else 1) for n in runs.counts}
    assert set(runs.counts) == {n.id for n in SHAPE.nodes}
    # Only a crash before the commit can make a node run twice.
    assert (runs.counts[node] == 2) == (step in BEFORE_COMMIT - {"before_run"})


async def test_killed_worker_mid_node_is_taken_over_after_the_lease() -> None:
    runs = Executions()
    started = asyncio.Event()
    release = asyncio.Event()
    hang = [False]

    async def long_node(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        if hang[0] and runs.counts[ctx.node_id] == 1:
            await release.wait()  # the first execution hangs until its worker is killed
        return "done"

    bp = blueprint("kill", [("s", "step"), ("long", "long"), ("t", "step")],
                   [("s", "long"), ("long", "t")])
    registry = {"step": runs.node(lambda ctx: ctx.node_id), "long": long_node}
    expected = await oracle(bp, registry, run_id="kill-run")
    runs.reset()
    started.clear()
    hang[0] = True
    async with Cluster([bp], registry, workers=1, lease_seconds=1.0) as cluster:
        victim = cluster.workers[0]
        run_id = await cluster.client.start_workflow(bp, {}, run_id="kill-run")
        await asyncio.wait_for(started.wait(), 5)
        killed_at = time.monotonic()
        await victim.kill()
        survivor = cluster.add_worker()
        cluster.workers.append(survivor)
        await survivor.start()
        result = await survivor.wait_for_result(run_id, timeout=10, poll_interval=0.02)
        took_over_after = time.monotonic() - killed_at
    release.set()
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    # The killed execution never committed: the survivor ran the node again, once.
    assert runs.counts == {"s": 1, "long": 2, "t": 1}
    assert took_over_after >= 0.5  # it had to wait for the message and the lease to expire


async def test_graceful_stop_releases_the_running_node_at_once() -> None:
    runs = Executions()
    started = asyncio.Event()

    async def long_node(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        if runs.counts[ctx.node_id] == 1:
            await asyncio.sleep(30)
        return "done"

    bp = blueprint("stop", [("long", "long"), ("t", "step")], [("long", "t")])
    registry = {"step": runs.node(lambda ctx: ctx.node_id), "long": long_node}
    # A long lease: the survivor can only pick the node up this fast if it was released.
    async with Cluster([bp], registry, workers=1, lease_seconds=20) as cluster:
        stopping = cluster.workers[0]
        run_id = await cluster.client.start_workflow(bp, {}, run_id="stop-run")
        await asyncio.wait_for(started.wait(), 5)
        await stopping.stop(timeout_seconds=0.1)
        stopped_at = time.monotonic()
        survivor = cluster.add_worker()
        cluster.workers = [survivor]
        await survivor.start()
        result = await survivor.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert time.monotonic() - stopped_at < 5
    assert runs.counts == {"long": 2, "t": 1}


async def test_long_node_is_not_run_twice_and_its_duplicate_is_not_poison() -> None:
    """A duplicate of a node that runs longer than max_receive_count deferrals waits for it;
    it neither runs the node again nor fails the run as a poison message."""
    runs = Executions()
    # slow is s's second successor: it comes from a (duplicated) queue message.
    bp = blueprint("long", [("s", "step"), ("x", "step"), ("slow", "slow"), ("t", "step")],
                   [("s", "x"), ("s", "slow"), ("slow", "t")])
    registry = {"step": runs.node(lambda ctx: ctx.node_id),
                "slow": runs.node(lambda ctx: "slow", delay=4.0)}
    async with Cluster([bp], registry, workers=2, lease_seconds=1.5, duplicate=True,
                       max_receive_count=2) as cluster:
        result = await cluster.run(bp, run_id="long-run", timeout=20)
        await cluster.settle()
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "x": 1, "slow": 1, "t": 1}
    assert cluster.queue.dead_letters == []


# -- 7. reconcile ---------------------------------------------------------------------------------


FAN = blueprint(
    "fan",
    [("s", "step"), ("a", "step"), ("b", "step"), ("c", "step"), ("j", "join")],
    [("s", "a"), ("s", "b"), ("s", "c"), ("a", "j"), ("b", "j"), ("c", "j")],
)


async def test_reconcile_re_enqueues_exactly_the_lost_frontier() -> None:
    runs = Executions()
    registry = shape_registry(runs)
    expected = await oracle(FAN, registry, {"in": 2}, run_id="lost")
    runs.reset()
    cluster = Cluster([FAN], registry, workers=2, start=False)
    async with cluster:
        client = cluster.client
        run_id = await client.start_workflow(FAN, {"in": 2}, run_id="lost")
        assert await client.reconcile(run_id) == ["s"]  # not leased: ready
        cluster.queue._entries.clear()
        # s runs (and a, its local continuation); b and c are enqueued ...
        assert await client.handle_job(JobPayload(run_id, "fan", "s")) == "processed"
        assert sorted(json.loads(b)["nodeId"] for b in cluster.queue.bodies()) == ["b", "c"]
        # ... and lost.
        cluster.queue._entries.clear()
        # A node leased by a live worker is not re-enqueued.
        context = client.create_context(run_id)
        claim = await context.claim("b", 0, "someone-else", 30)
        assert claim.status.value == "claimed"
        assert await client.reconcile(run_id) == ["c"]
        cluster.queue._entries.clear()
        await context.release("b", "someone-else")
        assert await client.reconcile(run_id) == ["b", "c"]
        # Reconciling again sends them again (harmless duplicates), never a done node.
        assert await client.reconcile(run_id) == ["b", "c"]
        await cluster.start()
        result = await client.wait_for_result(run_id, timeout=10, poll_interval=0.02)
        await cluster.settle()
        assert await client.reconcile(run_id) == []
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {n: 1 for n in ("s", "a", "b", "c", "j")}


async def test_reconcile_after_crash_between_commit_and_enqueue_of_a_continuation() -> None:
    runs = Executions()
    registry = shape_registry(runs)
    expected = await oracle(SHAPE, registry, {"in": 3}, run_id="gap")
    runs.reset()
    plan = CrashPlan().add("after_commit", "k")
    async with Cluster([SHAPE], registry, workers=3, lease_seconds=0.5,
                       crash_plan=plan) as cluster:
        run_id = await cluster.client.start_workflow(SHAPE, {"in": 3}, run_id="gap")
        result, reconciled = await drive(cluster, run_id, reconcile_every=0.7)
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    # The redelivered job of j re-announces m once k's lease has run out; a reconcile pass
    # that comes first finds m instead. Either way m runs once.
    assert [r for r in reconciled if r] in ([], [["m"]])
    assert runs.counts == {n.id: 1 for n in SHAPE.nodes}


async def test_reconcile_declares_a_missed_completion() -> None:
    runs = Executions()
    async with Cluster([FAN], shape_registry(runs), workers=1) as cluster:
        result = await cluster.run(FAN, run_id="missed")
        assert result.status == "completed"
        cluster.statuses["missed"]["status"] = "running"  # the status write was lost
        assert await cluster.client.reconcile("missed") == []
        assert cluster.status("missed") == "completed"


async def test_reconcile_of_an_unknown_run_is_a_clear_error() -> None:
    async with Cluster([FAN], shape_registry(Executions()), workers=1) as cluster:
        with pytest.raises(FlowcraftError, match="no stored context"):
            await cluster.client.reconcile("nope")


# -- 10. idempotency key ---------------------------------------------------------------------------


async def test_idempotency_key_is_stable_across_redelivery() -> None:
    keys: list[tuple[str, str, str]] = []

    async def pay(ctx: NodeContext) -> Any:
        keys.append((ctx.run_id, ctx.node_id, ctx.idempotency_key))
        return "paid"

    bp = blueprint("pay", [("charge", "pay"), ("refund", "pay")], [("charge", "refund")])
    plan = CrashPlan().add("after_run", "charge")
    async with Cluster([bp], {"pay": pay}, workers=2, lease_seconds=0.5,
                       crash_plan=plan) as cluster:
        first = await cluster.run(bp, run_id="run-1")
        second = await cluster.run(bp, run_id="run-2")
    assert first.status == second.status == "completed"
    run1_charge = [k for r, n, k in keys if r == "run-1" and n == "charge"]
    assert len(run1_charge) == 2  # crashed after running, then redelivered
    assert run1_charge[0] == run1_charge[1]
    distinct = {k for _, _, k in keys}
    assert len(distinct) == 4  # charge/refund x run-1/run-2
    assert all(run_id in key and node in key for run_id, node, key in keys)


# -- 12. malformed and poison messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("!!definitely not base64!!", "neither JSON nor base64"),
        (base64.b64encode(b"\xff\xfe garbage").decode(), "neither JSON nor base64"),
        ('{"blueprintId": "fan", "nodeId": "s"}', "missing runId"),
        ('["runId", "blueprintId", "nodeId"]', "must be a JSON object"),
    ],
)
async def test_malformed_message_is_dead_lettered(body: str, reason: str) -> None:
    async with Cluster([FAN], shape_registry(Executions()), workers=1) as cluster:
        await cluster.queue.send([body])
        await cluster.settle()
    assert len(cluster.queue) == 0
    assert len(cluster.queue.dead_letters) == 1
    assert reason in cluster.queue.dead_letters[0][1]


async def test_invalid_job_naming_a_run_fails_that_run() -> None:
    runs = Executions()
    async with Cluster([FAN], shape_registry(runs), workers=1, start=False) as cluster:
        await cluster.store.context("known").create({})
        cluster.statuses["known"] = {"runId": "known", "status": "running"}
        await cluster.queue.send([json.dumps({"runId": "known", "nodeId": "s"})])
        await cluster.start()
        await cluster.settle()
    assert len(cluster.queue.dead_letters) == 1
    assert cluster.status("known") == "failed"
    assert "blueprintId" in cluster.statuses["known"]["error"]


async def test_unknown_blueprint_is_dead_lettered_and_its_run_failed() -> None:
    runs = Executions()
    async with Cluster([FAN], shape_registry(runs), workers=1,
                       unknown_blueprint_grace_seconds=0) as cluster:
        await cluster.store.context("r-unknown").create({})
        cluster.statuses["r-unknown"] = {"runId": "r-unknown", "status": "running"}
        await cluster.queue.send([base64.b64encode(json.dumps(
            {"runId": "r-unknown", "blueprintId": "nope", "nodeId": "x"}).encode()).decode()])
        result = await cluster.client.wait_for_result("r-unknown", timeout=5, poll_interval=0.02)
        await cluster.settle()
    assert result.status == "failed"
    assert "unknown blueprint id 'nope'" in cluster.statuses["r-unknown"]["error"]
    assert len(cluster.queue) == 0
    assert [reason for _, reason in cluster.queue.dead_letters] == [
        cluster.statuses["r-unknown"]["error"]]


async def test_job_for_a_run_without_context_is_removed_and_no_run_is_invented() -> None:
    async with Cluster([FAN], shape_registry(Executions()), workers=1) as cluster:
        await cluster.queue.send([JobPayload("ghost", "fan", "s").to_json(),
                                  JobPayload("ghost-2", "nope", "s").to_json(),
                                  json.dumps({"runId": "ghost-3", "nodeId": "s"})])
        await cluster.settle()
    assert len(cluster.queue) == 0
    assert len(cluster.queue.dead_letters) == 3
    # Runs that never existed get no status record (a "failed" run nobody started).
    assert cluster.statuses == {}


async def test_message_failing_past_the_receive_limit_is_poison() -> None:
    runs = Executions()
    plan = CrashPlan().add("after_run", "b", times=100)  # b's worker always dies
    async with Cluster([FAN], shape_registry(runs), workers=2, lease_seconds=0.3,
                       max_receive_count=2, crash_plan=plan) as cluster:
        result = await cluster.run(FAN, run_id="poison", timeout=10)
        await cluster.settle()
    assert result.status == "failed"
    status = cluster.statuses["poison"]
    assert status["failedNodeId"] == "b"
    assert "attempted 3 times without finishing (limit 2)" in status["error"]
    assert runs.counts["b"] == 2  # two attempts, the third receive is refused
    assert runs.counts["j"] == 0
    assert [reason for _, reason in cluster.queue.dead_letters] == [status["error"]]
    assert len(cluster.queue) == 0
    assert result.errors[0].node_id == "b" and "poison" in result.errors[0].message


async def test_node_longer_than_its_lease_keeps_lease_and_message() -> None:
    """Lease and message visibility are renewed while a node runs, even with short leases."""
    runs = Executions()
    bp = blueprint("renew", [("s", "step"), ("x", "step"), ("slow", "slow")],
                   [("s", "x"), ("s", "slow")])
    registry = {"step": runs.node(lambda ctx: ctx.node_id),
                "slow": runs.node(lambda ctx: "slow", delay=2.0)}
    async with Cluster([bp], registry, workers=3, lease_seconds=0.6) as cluster:
        result = await cluster.run(bp, run_id="renew-run", timeout=10)
        await cluster.settle()
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "x": 1, "slow": 1}


class _LimitedContext(InMemoryDistributedContext):
    """A stored context with an item size limit, like DynamoDB's 400 KB."""

    limit = 10_000

    async def commit(self, node_id: str, iteration: int, owner: str, operations: Any,
                     claims: Any = (), lease_seconds: float = 60.0, **options: Any) -> Any:
        size = len(json.dumps({**(self._item() or {}),
                               **{op.key: op.value for op in operations}}, default=str))
        if size > self.limit:
            raise ContextTooLargeError(self.run_id, size, self.limit, "test store")
        return await super().commit(node_id, iteration, owner, operations, claims,
                                    lease_seconds, **options)


class _LimitedRunStore(InMemoryRunStore):
    def context(self, run_id: str) -> InMemoryDistributedContext:
        return _LimitedContext(self, run_id)


async def test_output_over_the_store_limit_fails_the_node_once_and_clearly() -> None:
    runs = Executions()
    bp = blueprint("big", [("small", "small"), ("huge", "huge"), ("after", "small")],
                   [("small", "huge"), ("huge", "after")])
    registry = {"small": runs.node(lambda ctx: "fine"),
                "huge": runs.node(lambda ctx: "h" * 50_000)}
    async with Cluster([bp], registry, workers=2, lease_seconds=0.5, max_receive_count=3,
                       store=_LimitedRunStore()) as cluster:
        result = await cluster.run(bp, run_id="big-run")
        await cluster.settle()
    assert result.status == "failed"
    assert result.errors[0].node_id == "huge"
    assert "big-run" in result.errors[0].message and "bytes" in result.errors[0].message
    assert result.errors[0].error_type == "ContextTooLargeError"
    assert runs.counts == {"small": 1, "huge": 1}  # not retried until poisoned
    assert "_outputs.huge" not in result.context
    assert cluster.queue.dead_letters == []


# s -> {b0 .. b5} -> j (all join).
WIDE = blueprint("wide", [("s", "step"), *((f"b{i}", "slow") for i in range(6)), ("j", "join")],
                 [*(("s", f"b{i}") for i in range(6)), *((f"b{i}", "j") for i in range(6))])


async def test_a_fan_out_runs_branches_in_the_slots_a_worker_has_free() -> None:
    """The source's commit claims one branch for its own job and one per free slot (three of
    four slots are free): those run without a message; the other two are sent."""
    runs = Executions()
    registry = {"step": runs.node(), "slow": runs.node(delay=0.05), "join": runs.node()}
    async with Cluster([WIDE], registry, workers=1, concurrency=4) as cluster:
        sends = cluster.workers[0].backend.queue.queue.calls
        result = await cluster.run(WIDE, {"in": 1}, run_id="wide")
        await cluster.settle()
    assert result.status == "completed"
    assert runs.counts == {n.id: 1 for n in WIDE.nodes}
    # The client's start job; the source's two branches it had no slot for (one batch); j
    # comes from the last branch's commit or its own message.
    assert sends["send"] in (2, 3), sends


def held_branches() -> tuple[Executions, asyncio.Event, asyncio.Event, dict[str, Any]]:
    """A registry for WIDE whose branches (``slow``) wait for ``hold`` once one has
    ``started``, so a test can stop or kill a worker while they run."""
    runs = Executions()
    started = asyncio.Event()
    hold = asyncio.Event()

    async def slow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        await hold.wait()
        return ctx.node_id

    registry = {"step": runs.node(), "slow": slow, "join": runs.node(lambda ctx: "joined")}
    return runs, started, hold, registry


async def test_a_worker_killed_while_running_branches_in_lent_slots_loses_none() -> None:
    """Kill the worker while the branches its source's commit claimed run (no message of
    their own): the source's message comes back, its job waits for those branches' leases
    to run out and re-announces them; another worker finishes the run."""
    runs, started, hold, registry = held_branches()
    async with Cluster([WIDE], registry, workers=1, concurrency=4, lease_seconds=0.5,
                       start=False) as cluster:
        first = cluster.workers[0]
        await first.start()
        run_id = await cluster.client.start_workflow(WIDE, {"in": 1}, run_id="killed")
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.05)
        # b0 in the source's job, b1 .. b3 in its lent slots; b4 and b5 sent in one batch.
        assert sorted(runs.counts) == ["b0", "b1", "b2", "b3", "s"]
        assert cluster.queue.calls["send"] == 2
        await first.kill()
        hold.set()
        second = cluster.add_worker()
        cluster.workers.append(second)
        await second.start()
        result = await second.wait_for_result(run_id, timeout=15, poll_interval=0.02)
    assert result.status == "completed"
    assert result.context["_outputs.j"] == "joined"
    assert all(runs.counts[f"b{i}"] >= 1 for i in range(6)) and runs.counts["j"] == 1


async def test_a_worker_stopped_while_running_branches_in_lent_slots_puts_them_back() -> None:
    """A stop that cancels the branches run in lent slots releases their leases and puts the
    source's message back at once: the next worker re-announces the branches."""
    runs, started, hold, registry = held_branches()
    async with Cluster([WIDE], registry, workers=1, concurrency=4, lease_seconds=30,
                       start=False) as cluster:
        first = cluster.workers[0]
        await first.start()
        run_id = await cluster.client.start_workflow(WIDE, {"in": 1}, run_id="stopped")
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.05)
        await first.stop(timeout_seconds=0.1)
        hold.set()
        second = cluster.add_worker()
        cluster.workers.append(second)
        await second.start()
        # Well within the 30 s lease: nothing waited for a lease to run out.
        result = await second.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert result.context["_outputs.j"] == "joined"
    assert runs.counts["j"] == 1


# s -> {a0 .. a3}; each a -> {x, y}; every x and y -> j (all join). a0 runs in the source's
# job and y0 (in a lent slot) ends at once; a1 .. a3 (lent slots) take a moment and claim
# y1 .. y3 into slots of their own after the source's job has begun to wait for its lent
# slots, and those hold on.
NESTED = blueprint(
    "nested",
    [("s", "step"), ("a0", "step"), *((f"a{i}", "late") for i in range(1, 4)),
     *((f"x{i}", "step") for i in range(4)), ("y0", "step"),
     *((f"y{i}", "slow") for i in range(1, 4)), ("j", "join")],
    [*(("s", f"a{i}") for i in range(4)), *((f"a{i}", f"x{i}") for i in range(4)),
     *((f"a{i}", f"y{i}") for i in range(4)), *((f"x{i}", "j") for i in range(4)),
     *((f"y{i}", "j") for i in range(4))])


async def test_the_message_waits_for_successors_claimed_by_nodes_run_in_lent_slots(
        caplog: pytest.LogCaptureFixture) -> None:
    """Nodes run in lent slots claim successors into slots of their own: the source's message
    is acknowledged only when those have ended too, so a kill while they run loses none."""
    runs = Executions()
    started = asyncio.Event()
    hold = asyncio.Event()

    async def slow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        if runs.counts.keys() >= {f"y{i}" for i in range(4)}:
            started.set()
        await hold.wait()
        return ctx.node_id

    registry = {"step": runs.node(), "late": runs.node(delay=0.1), "slow": slow,
                "join": runs.node(lambda ctx: "joined")}
    async with Cluster([NESTED], registry, workers=1, concurrency=8, lease_seconds=0.5,
                       start=False) as cluster:
        first = cluster.workers[0]
        await first.start()
        run_id = await cluster.client.start_workflow(NESTED, {"in": 1}, run_id="nested")
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.2)  # every x and y0 have ended; y1 .. y3 run in lent slots
        assert cluster.queue.calls["send"] == 1  # the start job: everything else ran here
        assert len(cluster.queue) == 1  # the source's message, not acknowledged
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        await first.kill()
        hold.set()
        second = cluster.add_worker()
        cluster.workers.append(second)
        await second.start()
        result = await second.wait_for_result(run_id, timeout=15, poll_interval=0.02)
    assert result.status == "completed"
    assert result.context["_outputs.j"] == "joined"
    assert runs.counts["j"] == 1


async def test_a_continuation_whose_lease_ran_out_before_it_started_does_not_run() -> None:
    """The commit of s claims a (its continuation), then sends b: when that send takes longer
    than the lease, a's lease runs out and another worker takes a over. a must not run in
    s's job as well once the send returns."""
    runs = Executions()
    bp = blueprint("slowsend", [("s", "step"), ("a", "step"), ("b", "step")],
                   [("s", "a"), ("s", "b")])
    async with Cluster([bp], {"step": runs.node()}, workers=1, concurrency=1,
                       lease_seconds=0.3, start=False) as cluster:
        first = cluster.workers[0]
        queue = first.backend.queue
        send = queue.send

        async def slow_send(jobs: list[JobPayload], delay_seconds: float = 0) -> None:
            if any(job.node_id == "b" for job in jobs):
                await asyncio.sleep(1.0)  # longer than the lease
            await send(jobs, delay_seconds)

        queue.send = slow_send
        await first.start()
        run_id = await cluster.client.start_workflow(bp, {}, run_id="slowsend")
        await asyncio.sleep(0.6)  # s committed; a's lease has run out, b is being sent
        assert runs.counts == {"s": 1}
        second = cluster.add_worker()
        cluster.workers.append(second)
        assert "a" in await second.reconcile(run_id)
        await second.start()
        result = await second.wait_for_result(run_id, timeout=10, poll_interval=0.02)
        await cluster.settle()
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "a": 1, "b": 1}
