"""The distributed job algorithm on the in-process backend: several workers on one
queue with SQS-like redelivery, compared against the in-memory ``FlowRuntime``."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest

from distributed_helpers import Cluster, Executions, comparable, oracle, wait_until
from flowcraft import InMemoryEventBus, NodeContext, NodeResult, WorkflowBlueprint
from flowcraft.distributed.context import VERSION_KEY
from flowcraft.distributed.coordination import cancel_key, poison_key
from flowcraft.distributed.job import JobPayload


def blueprint(bp_id: str, nodes: list[dict[str, Any]], edges: list[dict[str, Any]],
              version: str | None = None) -> WorkflowBlueprint:
    raw: dict[str, Any] = {"id": bp_id, "nodes": nodes, "edges": edges}
    if version is not None:
        raw["metadata"] = {"version": version}
    return WorkflowBlueprint.model_validate(raw)


def n(node_id: str, uses: str | None = None, **config: Any) -> dict[str, Any]:
    node: dict[str, Any] = {"id": node_id, "uses": uses or node_id}
    if config:
        node["config"] = config
    return node


def e(source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, "target": target, **extra}


def fan_in(bp_id: str, width: int) -> WorkflowBlueprint:
    branches = [f"b{i}" for i in range(width)]
    return blueprint(
        bp_id,
        [n("s", "step"), *(n(b, "step") for b in branches), n("j", "step")],
        [*(e("s", b) for b in branches), *(e(b, "j") for b in branches)],
    )


def chain(bp_id: str, length: int) -> WorkflowBlueprint:
    ids = [f"c{i}" for i in range(length)]
    return blueprint(bp_id, [n(i, "step") for i in ids],
                     [e(a, b) for a, b in itertools.pairwise(ids)])


# -- 1. exactly-once effects under at-least-once delivery ----------------------------------------


async def test_duplicated_shuffled_delivery_runs_every_node_once() -> None:
    runs = Executions()
    bp = blueprint(
        "dup",
        [n("s"), n("a"), n("b"), n("c"), n("all_join"), n("any_join", joinStrategy="any"),
         n("end")],
        [e("s", "a"), e("s", "b"), e("s", "c"),
         e("a", "all_join"), e("b", "all_join"), e("c", "all_join"),
         e("a", "any_join"), e("b", "any_join"),
         e("all_join", "end"), e("any_join", "end")],
    )
    registry = {
        "s": runs.node(lambda ctx: 1),
        # a and b deliver the same value to the any join, so its first arrival does not
        # change the result.
        "a": runs.node(lambda ctx: ctx.input + 1),
        "b": runs.node(lambda ctx: ctx.input + 1),
        "c": runs.node(lambda ctx: ctx.input * 10),
        "all_join": runs.node(lambda ctx: sum(ctx.input.values())),
        "any_join": runs.node(lambda ctx: ctx.input * 100),
        "end": runs.node(lambda ctx: ctx.input),
    }
    expected = await oracle(bp, registry, {"seed": 1}, run_id="dup-run")
    assert expected.status == "completed"
    runs.reset()
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True,
                       seed=7) as cluster:
        result = await cluster.run(bp, {"seed": 1}, run_id="dup-run")
        await cluster.settle()
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    assert result.context["_inputs.all_join"] == {"a": 2, "b": 2, "c": 10}
    assert result.context["_outputs.any_join"] == 200
    assert len(cluster.queue) == 0


@pytest.mark.parametrize("seed", range(4))
async def test_duplicates_with_latent_store_and_many_joins(seed: int) -> None:
    """Joins whose predecessors commit concurrently (the store yields between calls)."""
    from distributed_helpers import LatentRunStore

    runs = Executions()
    width = 6
    bp = fan_in("wide", width)
    registry = {"step": runs.node(lambda ctx: ctx.node_id)}
    expected = await oracle(bp, registry, run_id=f"wide-{seed}")
    runs.reset()
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True, seed=seed,
                       store=LatentRunStore(seed)) as cluster:
        result = await cluster.run(bp, run_id=f"wide-{seed}")
        await cluster.settle()
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}


# -- 4. skip propagation across workers -----------------------------------------------------------


async def test_conditional_diamond_converges_across_workers() -> None:
    runs = Executions()
    bp = blueprint(
        "diamond",
        [n("s"), n("left"), n("left2"), n("right"), n("join"), n("end")],
        [e("s", "left", condition="result.output.go == 'left'"),
         e("s", "right", condition="result.output.go == 'right'"),
         e("left", "left2"), e("left2", "join"), e("right", "join"), e("join", "end")],
    )
    registry = {
        "s": runs.node(lambda ctx: {"go": "right"}),
        "left": runs.node(), "left2": runs.node(), "right": runs.node(),
        "join": runs.node(lambda ctx: sorted(ctx.input)), "end": runs.node(),
    }
    expected = await oracle(bp, registry, run_id="diamond-run")
    runs.reset()
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True) as cluster:
        result = await cluster.run(bp, run_id="diamond-run")
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.join"] == ["right"]
    assert runs.counts == {"s": 1, "right": 1, "join": 1, "end": 1}
    data = await cluster.client.create_context("diamond-run").load()
    assert data["_flowcraft.node.left"]["skipped"] is True
    assert data["_flowcraft.node.left2"]["skipped"] is True


async def test_join_whose_predecessors_are_all_skipped_is_skipped() -> None:
    runs = Executions()
    bp = blueprint(
        "all-skipped",
        [n("s"), n("a"), n("b"), n("join"), n("other"), n("end")],
        [e("s", "a", condition="False"), e("s", "b", condition="False"), e("s", "other"),
         e("a", "join"), e("b", "join"), e("join", "end"), e("other", "end")],
    )
    registry = {k: runs.node() for k in ("s", "a", "b", "join", "other", "end")}
    expected = await oracle(bp, registry, run_id="r")
    runs.reset()
    async with Cluster([bp], registry, workers=3) as cluster:
        result = await cluster.run(bp, run_id="r")
    assert result.status == expected.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {"s": 1, "other": 1, "end": 1}


async def test_run_completes_only_after_a_late_predecessor_of_an_any_join() -> None:
    """The any join (the only terminal) fires on the first arrival; the slow branch is still
    running. The run is complete when that branch has finished, as in memory."""
    runs = Executions()
    bp = blueprint(
        "late",
        [n("s"), n("fast"), n("slow"), n("j", joinStrategy="any")],
        [e("s", "fast"), e("s", "slow"), e("fast", "j", transform="1"),
         e("slow", "j", transform="1")],
    )
    registry = {"s": runs.node(), "fast": runs.node(), "slow": runs.node(delay=0.5),
                "j": runs.node()}
    expected = await oracle(bp, registry, run_id="late-run")
    runs.reset()
    async with Cluster([bp], registry, workers=2) as cluster:
        result = await cluster.run(bp, run_id="late-run")
    assert result.status == "completed"
    assert "_outputs.slow" in result.context
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {"s": 1, "fast": 1, "slow": 1, "j": 1}


# -- 5. failure -----------------------------------------------------------------------------------


async def test_failed_node_fails_run_and_marks_successors() -> None:
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await asyncio.sleep(0.1)  # c is claimed (and runs) before b fails
        raise RuntimeError("card declined")

    bp = blueprint(
        "failing",
        [n("s"), n("b", "boom"), n("c", "slow"), n("d_all"), n("e_any", joinStrategy="any")],
        [e("s", "b"), e("s", "c"), e("b", "d_all"), e("c", "d_all"), e("b", "e_any"),
         e("c", "e_any")],
    )
    registry = {"s": runs.node(), "boom": boom, "slow": runs.node(delay=0.3),
                "d_all": runs.node(), "e_any": runs.node()}
    bus = InMemoryEventBus()
    async with Cluster([bp], registry, workers=2, event_bus=bus) as cluster:
        result = await cluster.run(bp, run_id="fail-run")
        await cluster.settle()
        store = cluster.coordination
        assert result.status == "failed"
        assert [err.node_id for err in result.errors] == ["b"]
        assert "card declined" in result.errors[0].message
        assert result.errors[0].attempt == 1
        status = await cluster.client.get_run_status("fail-run")
        assert status is not None
        assert status["status"] == "failed" and status["failedNodeId"] == "b"
        assert "node 'b' failed" in status["error"] and "card declined" in status["error"]
        # Successors that needed b never ran; c (independent, already running) finished,
        # and the job for e_any it enqueued was dropped.
        assert runs.counts["d_all"] == 0 and runs.counts["e_any"] == 0
        assert runs.counts["c"] == 1
        assert await store.get(poison_key("fail-run", "d_all")) == "b"
        assert await store.get(cancel_key("fail-run", "e_any")) == "b"
        assert await store.get(cancel_key("fail-run", "d_all")) is None
        # A later job of the failed run is dropped without running anything.
        outcome = await cluster.client.handle_job(JobPayload("fail-run", "failing", "e_any"))
        assert outcome == "dropped"
        assert runs.counts["e_any"] == 0
    finishes = [ev for ev in bus.of_type("workflow:finish") if ev.payload["runId"] == "fail-run"]
    assert [ev.payload["status"] for ev in finishes] == ["failed"]


async def test_failure_matches_in_memory_status_and_skips_nothing_it_should_not() -> None:
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        raise ValueError("bad input")

    bp = blueprint("fail2", [n("s"), n("x", "boom"), n("y")], [e("s", "x"), e("x", "y")])
    registry = {"s": runs.node(), "boom": boom, "y": runs.node()}
    expected = await oracle(bp, registry, run_id="f2")
    runs.reset()
    async with Cluster([bp], registry, workers=2, duplicate=True) as cluster:
        result = await cluster.run(bp, run_id="f2")
        await cluster.settle()
    assert result.status == expected.status == "failed"
    assert result.errors[0].node_id == expected.errors[0].node_id == "x"
    assert result.errors[0].message == expected.errors[0].message
    assert runs.counts == {"s": 1, "x": 1}


# -- 6. completion declared once ------------------------------------------------------------------


async def test_completion_is_declared_exactly_once() -> None:
    runs = Executions()
    bp = blueprint(
        "once",
        [n("s"), n("a"), n("b"), n("t1"), n("t2"), n("t3", joinStrategy="any")],
        [e("s", "a"), e("s", "b"), e("a", "t1"), e("b", "t2"), e("a", "t3"), e("b", "t3")],
    )
    registry = {k: runs.node(lambda ctx: 1) for k in ("s", "a", "b", "t1", "t2", "t3")}
    bus = InMemoryEventBus()
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True,
                       event_bus=bus) as cluster:
        result = await cluster.run(bp, run_id="once-run")
        await cluster.settle()
        assert result.status == "completed"
        # Reconciling a completed run declares nothing again.
        assert await cluster.client.reconcile("once-run") == []
    completed = [ev for ev in bus.of_type("workflow:finish")
                 if ev.payload.get("status") == "completed"]
    assert len(completed) == 1
    assert runs.counts == {k: 1 for k in ("s", "a", "b", "t1", "t2", "t3")}


# -- 8. awaiting and resume ----------------------------------------------------------------------


async def test_wait_parks_the_run_and_resume_routes_the_action() -> None:
    runs = Executions()
    bp = blueprint(
        "approval",
        [n("s"), n("w", "wait"), n("approved"), n("rejected"), n("end")],
        [e("s", "w"), e("w", "approved", action="approve"), e("w", "rejected", action="reject"),
         e("approved", "end"), e("rejected", "end")],
    )
    registry = {k: runs.node() for k in ("s", "approved", "rejected", "end")}
    from flowcraft import FlowRuntime

    memory = FlowRuntime(blueprints={bp.id: bp}, registry=registry)
    parked = await memory.run(bp, {"order": 7}, run_id="appr")
    assert parked.status == "awaiting"
    expected = await memory.resume(bp, parked.serialized_context,
                                   {"action": "approve", "output": {"ok": True}}, run_id="appr")
    assert expected.status == "completed"
    runs.reset()
    async with Cluster([bp], registry, workers=2, duplicate=True) as cluster:
        waiting = await cluster.run(bp, {"order": 7}, run_id="appr")
        assert waiting.status == "awaiting"
        assert waiting.context["_awaitingNodeIds"] == ["w"]
        assert comparable(waiting.context) == comparable(parked.context)
        assert cluster.status("appr") == "awaiting"
        await cluster.settle()
        assert cluster.status("appr") == "awaiting"  # duplicates do not wake it
        enqueued = await cluster.client.resume_with_action("appr", "approve", {"ok": True})
        assert enqueued == ["w"]
        await cluster.client.reconcile("appr")
        result = await cluster.client.wait_for_result("appr", timeout=10, poll_interval=0.02)
        await cluster.settle()
        stored = await cluster.client.create_context("appr").load()
    # Leases and attempt counts go with the commits (parks and resumes included).
    assert [k for k in stored if k.startswith(("_flowcraft.attempts.", "_flowcraft.lock."))] == []
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.w"] == {"ok": True}
    assert "_awaitingNodeIds" not in result.context
    assert runs.counts == {"s": 1, "approved": 1, "end": 1}
    assert result.context["_inputs.end"] == {"approved": result.context["_outputs.approved"]}


@pytest.mark.parametrize("seed", range(3))
async def test_parallel_waits_all_park_and_concurrent_resumes_all_land(seed: int) -> None:
    """Three wait nodes park at once and are resumed at once: no update of the awaiting
    list is lost (the store yields between calls, so parks and resumes interleave)."""
    from distributed_helpers import LatentRunStore

    runs = Executions()
    waits = ["w1", "w2", "w3"]
    bp = blueprint("waits", [n("s"), *(n(w, "wait") for w in waits), n("end")],
                   [*(e("s", w) for w in waits), *(e(w, "end") for w in waits)])
    registry = {"s": runs.node(), "end": runs.node(lambda ctx: sorted(ctx.input))}
    async with Cluster([bp], registry, workers=3, duplicate=True,
                       store=LatentRunStore(seed, max_delay=0.01)) as cluster:
        parked = await cluster.run(bp, run_id="waits")
        await cluster.settle()
        assert parked.status == "awaiting"
        assert sorted(parked.context["_awaitingNodeIds"]) == waits
        assert sorted(parked.context["_awaitingDetails"]) == waits
        assert sorted(cluster.statuses["waits"]["awaitingNodeIds"]) == waits
        await asyncio.gather(*(cluster.client.resume_with_action("waits", "go", w, node_id=w)
                               for w in waits))
        result = await cluster.client.wait_for_result("waits", timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert "_awaitingNodeIds" not in result.context
    assert result.context["_outputs.end"] == waits
    assert runs.counts == {"s": 1, "end": 1}


async def test_run_is_awaiting_only_after_the_other_branches_finished() -> None:
    runs = Executions()
    bp = blueprint("wait-beside", [n("s"), n("w", "wait"), n("slow"), n("t")],
                   [e("s", "w"), e("s", "slow"), e("slow", "t")])
    registry = {"s": runs.node(), "slow": runs.node(delay=0.5), "t": runs.node()}
    expected = await oracle(bp, registry, run_id="beside")
    assert expected.status == "awaiting"
    runs.reset()
    async with Cluster([bp], registry, workers=2) as cluster:
        result = await cluster.run(bp, run_id="beside")
    assert result.status == "awaiting"
    assert comparable(result.context) == comparable(expected.context)
    assert "_outputs.t" in result.context


async def test_resume_of_a_node_that_is_not_awaiting_is_an_error() -> None:
    from flowcraft import FlowcraftError

    bp = blueprint("nowait", [n("s")], [])
    runs = Executions()
    async with Cluster([bp], {"s": runs.node()}, workers=1) as cluster:
        result = await cluster.run(bp, run_id="nw")
        assert result.status == "completed"
        with pytest.raises(FlowcraftError, match="not awaiting"):
            await cluster.client.resume_with_action("nw", "approve")


# -- 9. versioning ---------------------------------------------------------------------------------


async def test_version_mismatch_is_refused_without_losing_the_job() -> None:
    runs = Executions()
    nodes, edges = [n("s", "step"), n("t", "step")], [e("s", "t")]
    v1 = blueprint("versioned", nodes, edges, version="1")
    v2 = blueprint("versioned", nodes, edges, version="2")
    registry = {"step": runs.node()}
    cluster = Cluster([v2], registry, workers=1, max_receive_count=2)
    refusing = cluster.workers[0]
    refusing.max_delay_seconds = 0.1  # so the refused job comes back quickly in this test
    async with cluster:
        run_id = await refusing.start_workflow(v1, {"x": 1}, run_id="old")
        assert (await refusing.create_context("old").load())[VERSION_KEY] == "1"
        # The v2 worker sees the job several times (more than max_receive_count) ...
        await asyncio.sleep(1.0)
        assert runs.counts["s"] == 0
        assert cluster.status(run_id) == "running"  # not failed ...
        assert len(cluster.queue) == 1  # ... and not lost
        assert cluster.queue.dead_letters == []
        # ... and a worker with the run's version picks it up.
        from flowcraft import FlowRuntime

        matching = cluster.add_worker(FlowRuntime(blueprints={"versioned": v1},
                                                  registry=registry))
        cluster.workers.append(matching)
        await matching.start()
        result = await matching.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1}


async def test_run_without_stored_version_is_accepted() -> None:
    runs = Executions()
    bp = blueprint("versioned", [n("s", "step"), n("t", "step")], [e("s", "t")], version="2")
    async with Cluster([bp], {"step": runs.node()}, workers=1) as cluster:
        # What the reference's JavaScript client writes: a context without a version, a
        # status record, and a plain JSON job.
        await cluster.store.context("js").create({"input": 5})
        cluster.statuses["js"] = {"runId": "js", "status": "running", "lastUpdated": 0}
        await cluster.queue.send([json.dumps(
            {"runId": "js", "blueprintId": "versioned", "nodeId": "s"})])
        result = await cluster.client.wait_for_result("js", timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert runs.counts == {"s": 1, "t": 1}


# -- 11. durable sleep -----------------------------------------------------------------------------


async def test_durable_sleep_does_not_hold_the_worker() -> None:
    ran_at: dict[str, float] = {}
    processed_at: dict[str, float] = {}

    def stamp(ctx: NodeContext) -> Any:
        ran_at[ctx.node_id] = time.monotonic()
        return ctx.node_id

    def on_processed(event: Any) -> None:
        processed_at.setdefault(event.payload["nodeId"], time.monotonic())

    bus = InMemoryEventBus()
    bus.subscribe(on_processed, "job:processed")
    bp = blueprint("sleepy", [n("s"), {"id": "nap", "uses": "sleep",
                                       "params": {"duration": "2s"}}, n("after")],
                   [e("s", "nap"), e("nap", "after")])
    runs = Executions()
    registry = {"s": runs.node(stamp), "after": runs.node(stamp)}
    async with Cluster([bp], registry, workers=1, concurrency=1, event_bus=bus) as cluster:
        started = time.monotonic()
        run_id = await cluster.client.start_workflow(bp, {}, run_id="nap-run")
        await wait_until(lambda: "nap" in processed_at, timeout=5)
        assert processed_at["nap"] - started < 1.0  # the sleep node's job ended at once
        await asyncio.sleep(0.3)
        worker = cluster.workers[0]
        assert worker.idle  # nothing holds the worker while the run sleeps
        assert len(cluster.queue) == 1  # the successor, delayed
        data = await worker.create_context(run_id).load()
        assert data["_flowcraft.node.nap"]["wakeUpAt"] > time.time() + 1
        result = await worker.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"
    assert ran_at["after"] - processed_at["nap"] >= 1.8
    assert runs.counts == {"s": 1, "after": 1}


# -- 13. many runs interleaved -------------------------------------------------------------------


async def test_many_concurrent_runs_on_one_queue() -> None:
    runs = Executions()
    bp = fan_in("fan10", 8)  # 10 nodes

    def step(ctx: NodeContext) -> Any:
        if ctx.node_id == "s":
            return ctx.context.data["k"]
        if ctx.node_id == "j":
            return sum(ctx.input.values())
        return ctx.input * 2 + int(ctx.node_id[1:])

    registry = {"step": runs.node(step)}
    expected = {}
    for k in range(20):
        expected[k] = await oracle(bp, registry, {"k": k}, run_id=f"many-{k}")
    runs.reset()
    async with Cluster([bp], registry, workers=3, concurrency=4, shuffle=True) as cluster:
        ids = [await cluster.client.start_workflow(bp, {"k": k}, run_id=f"many-{k}")
               for k in range(20)]
        results = [await cluster.client.wait_for_result(i, timeout=30, poll_interval=0.02)
                   for i in ids]
    for k, result in enumerate(results):
        assert result.status == "completed"
        assert comparable(result.context) == comparable(expected[k].context)
        assert result.context["_outputs.j"] == sum(k * 2 + i for i in range(8))
    assert sum(runs.counts.values()) == 20 * 10


# -- 14. service calls per node --------------------------------------------------------------------


async def _measure(bp: WorkflowBlueprint, registry: dict[str, Any]) -> dict[str, float]:
    async with Cluster([bp], registry, workers=1, concurrency=8) as cluster:
        worker = cluster.workers[0]
        result = await cluster.run(bp, run_id="cost")
        await cluster.settle()
    assert result.status == "completed"
    nodes = len(bp.nodes)
    store_ops = sum(cluster.store.calls.values())
    per_node = {
        "store_ops": store_ops / nodes,
        "claims": cluster.store.calls.get("claim", 0) / nodes,
        "commits": cluster.store.calls.get("commit", 0) / nodes,
        "loads": cluster.store.calls.get("load", 0) / nodes,
        "applies": cluster.store.calls.get("apply", 0) / nodes,
        "queue_sends": cluster.queue.calls.get("send", 0) / nodes,
        "queue_deletes": cluster.queue.calls.get("delete", 0) / nodes,
        "queue_visibility": cluster.queue.calls.get("visibility", 0) / nodes,
        "status_writes": worker.status_writes / nodes,
        "coordination": cluster.coordination.calls / nodes,
    }
    print(f"\n{bp.id}: {nodes} nodes; store {dict(cluster.store.calls)}; "
          f"queue {dict(cluster.queue.calls)}; status writes {worker.status_writes}; "
          f"coordination {cluster.coordination.calls}")
    print(f"{bp.id} per node: " + ", ".join(f"{k} {v:.2f}" for k, v in per_node.items()))
    return per_node


async def test_service_calls_per_node_chain() -> None:
    runs = Executions()
    cost = await _measure(chain("chain20", 20), {"step": runs.node(lambda ctx: 1)})
    # One claim for the start node, then one commit per node (which claims the next).
    assert cost["store_ops"] <= 1.15
    assert cost["commits"] <= 1.0
    assert cost["claims"] <= 0.05
    assert cost["applies"] == 0
    assert cost["queue_sends"] <= 0.05
    assert cost["queue_deletes"] <= 0.05
    assert cost["queue_visibility"] == 0
    assert cost["status_writes"] <= 0.15
    assert cost["coordination"] == 0


async def test_service_calls_per_node_fan_in() -> None:
    runs = Executions()
    cost = await _measure(fan_in("fan20", 20), {"step": runs.node(lambda ctx: 1)})
    assert cost["store_ops"] <= 2.1
    assert cost["commits"] <= 1.0
    assert cost["claims"] <= 1.0
    assert cost["queue_sends"] <= 0.2  # the start job, two batches of 10 branches, the join
    assert cost["queue_deletes"] <= 1.0
    assert cost["queue_visibility"] == 0
    assert cost["status_writes"] <= 0.15
    assert cost["coordination"] == 0


async def test_action_routing_matches_in_memory() -> None:
    runs = Executions()
    bp = blueprint(
        "actions",
        [n("s"), n("yes"), n("no"), n("default")],
        [e("s", "yes", action="ok", condition="result.output > 5"),
         e("s", "no", action="ko"), e("s", "default")],
    )
    for value in (3, 9):
        registry = {"s": lambda ctx, v=value: NodeResult(output=v, action="ok"),
                    "yes": runs.node(), "no": runs.node(), "default": runs.node()}
        expected = await oracle(bp, registry, run_id=f"act-{value}")
        async with Cluster([bp], registry, workers=2, duplicate=True) as cluster:
            result = await cluster.run(bp, run_id=f"act-{value}")
        assert result.status == expected.status == "completed"
        assert comparable(result.context) == comparable(expected.context)
        assert ("_outputs.yes" in result.context) == (value > 5)
        assert ("_outputs.default" in result.context) == (value <= 5)
        assert "_outputs.no" not in result.context


# -- loops ---------------------------------------------------------------------------------------


async def test_loop_then_batch_matches_in_memory() -> None:
    """The loop skips its exit target on the iterations that continue; the break still
    runs it (and the batch behind it), as in memory."""
    from flowcraft import Flow

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
            .node("last_round", runs.node(lambda ctx: ctx.input))
            .edge("ctl", "fan")
            .edge("body", "last_round", condition="result.output == 3"))
    bp = flow.to_blueprint()
    initial = {"items": [1, 2.5, 3]}
    expected = await oracle(bp, flow.registry(), initial, run_id="lb")
    assert expected.status == "completed"
    runs.reset()
    async with Cluster([bp], flow.registry(), workers=3, duplicate=True, shuffle=True) as cluster:
        result = await cluster.run(bp, initial, run_id="lb")
    assert result.status == "completed"
    assert result.context["squares"] == [1, 6.25, 9]
    assert result.context["_outputs.last_round"] == 3
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts["body"] == 3 and runs.counts["last_round"] == 1


async def test_sleep_longer_than_the_queues_longest_delay_is_chained() -> None:
    ran_at: dict[str, float] = {}

    def stamp(ctx: NodeContext) -> Any:
        ran_at[ctx.node_id] = time.monotonic()
        return ctx.node_id

    runs = Executions()
    bp = blueprint("long-nap", [n("s"), {"id": "nap", "uses": "sleep",
                                         "params": {"duration": "3s"}}, n("after")],
                   [e("s", "nap"), e("nap", "after")])
    async with Cluster([bp], {"s": runs.node(stamp), "after": runs.node(stamp)},
                       workers=1) as cluster:
        cluster.workers[0].max_delay_seconds = 1.0  # the queue delays by 1 s at most
        result = await cluster.run(bp, run_id="long-nap")
    assert result.status == "completed"
    assert ran_at["after"] - ran_at["s"] >= 2.8
    assert runs.counts == {"s": 1, "after": 1}


async def test_reconcile_needs_no_node_implementations() -> None:
    runs = Executions()
    bp = chain("no-code", 3)
    async with Cluster([bp], {"step": runs.node()}, workers=1, start=False) as cluster:
        from flowcraft import FlowRuntime

        reconciler = cluster.add_worker(FlowRuntime(blueprints={bp.id: bp}))
        run_id = await reconciler.start_workflow(bp, {}, run_id="no-code")
        cluster.queue._entries.clear()  # the start job is lost
        assert await reconciler.reconcile(run_id) == ["c0"]
        await cluster.start()
        result = await cluster.client.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    assert result.status == "completed"


async def test_busy_worker_receives_several_messages_at_once() -> None:
    """A busy worker with short jobs receives ahead of its free slots, so a fan-out is
    received in full batches instead of one message per finished branch; the source's
    commit claims as many branches as the worker has free slots for, the rest come from
    the queue."""
    finished = itertools.count()

    async def slow(ctx: Any) -> int:
        await asyncio.sleep(0.005 * (next(finished) % 7 + 1))  # branches finish one by one
        return 1

    bp = fan_in("fan40", 40)
    async with Cluster([bp], {"step": slow}, workers=1, concurrency=8) as cluster:
        worker = cluster.workers[0]
        batches: list[int] = []
        receive = worker.backend.queue.receive

        async def counted(max_messages: int, wait_seconds: float) -> list[Any]:
            messages = await receive(max_messages, wait_seconds)
            if messages:
                batches.append(len(messages))
            return messages

        worker.backend.queue.receive = counted
        result = await cluster.run(bp, run_id="batched")
    assert result.status == "completed"
    # 42 nodes: the source's commit claims one branch per slot (8 at most), the rest arrive.
    assert 42 - 8 <= sum(batches) <= 42, batches
    # One message per free slot took 14 receives or more; receiving ahead, about 6.
    assert len(batches) <= 8, batches
