"""``FlowRuntime.stepper``: one node per step, the state inspectable between steps, and the
same end as ``run``."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcraft import Flow, FlowRuntime, NodeContext, NodeResult, Step, WorkflowBlueprint
from test_properties import dag_edges


def diamond() -> Flow:
    async def fetch(ctx: NodeContext) -> Any:
        await ctx.context.set("fetched", True)
        return 10

    async def double(ctx: NodeContext) -> Any:
        return ctx.input * 2

    async def never(ctx: NodeContext) -> Any:
        raise AssertionError("an untaken branch ran")

    async def report(ctx: NodeContext) -> Any:
        return ctx.input

    return (
        Flow("diamond")
        .node("fetch", fetch)
        .node("double", double)
        .node("halve", never)
        .node("report", report)
        .edge("fetch", "double", condition="fetch > 5")
        .edge("fetch", "halve", condition="fetch <= 5")
        .edge("double", "report")
        .edge("halve", "report")
    )


async def test_each_step_runs_one_node_and_the_state_can_be_inspected_between_steps() -> None:
    flow = diamond()
    runtime = FlowRuntime(registry=flow.registry())

    async with runtime.stepper(flow.to_blueprint(), {"who": "me"}) as stepper:
        assert stepper.pending == ["fetch"] and not stepper.done
        assert stepper.state == {"who": "me"}

        assert await stepper.next() == Step("fetch", output=10)
        assert stepper.state == {"who": "me", "fetched": True, "_outputs.fetch": 10}
        assert stepper.pending == ["double"]  # 'halve' was skipped along with the routing

        assert await stepper.next() == Step("double", output=20)
        assert await stepper.next() == Step("report", output={"double": 20})
        assert stepper.done and stepper.pending == []
        assert await stepper.next() is None

    assert stepper.result is not None
    assert stepper.result.status == "completed"
    direct = await runtime.run(flow.to_blueprint(), {"who": "me"})
    assert stepper.result.context == direct.context


async def test_parallel_branches_wait_for_their_own_step() -> None:
    started: list[str] = []

    def branch(name: str) -> Any:
        async def node(ctx: NodeContext) -> Any:
            started.append(name)
            return name

        return node

    flow = (
        Flow("fan").node("a", branch("a")).node("b", branch("b")).node("c", branch("c"))
        .edge("a", "b").edge("a", "c")
    )
    async with FlowRuntime(registry=flow.registry()).stepper(flow.to_blueprint()) as stepper:
        await stepper.next()
        await asyncio.sleep(0.01)
        assert started == ["a"] and stepper.pending == ["b", "c"]
        assert (await stepper.next()).node_id == "b"
        assert started == ["a", "b"]
        result = await stepper.run_to_end()

    assert result.status == "completed" and started == ["a", "b", "c"]


async def test_a_failing_node_and_an_awaiting_node_are_steps_too() -> None:
    async def boom(ctx: NodeContext) -> Any:
        raise ValueError("no")

    failing = Flow("fails").node("boom", boom)
    runtime = FlowRuntime(registry=failing.registry())
    async with runtime.stepper(failing.to_blueprint()) as stepper:
        step = await stepper.next()
    assert step is not None and step.error is not None
    assert step.error.message == "ValueError: no"
    assert stepper.result is not None and stepper.result.status == "failed"

    waiting = Flow("waits").wait("approval", prompt="ok?").node(
        "after", lambda ctx: "after").edge("approval", "after", action="yes")
    runtime = FlowRuntime(registry=waiting.registry())
    async with runtime.stepper(waiting.to_blueprint()) as stepper:
        step = await stepper.next()
    assert step == Step("approval", awaiting={"reason": "external_event", "prompt": "ok?"})
    assert stepper.result is not None and stepper.result.status == "awaiting"


async def test_loops_step_through_each_iteration_with_actions() -> None:
    async def tick(ctx: NodeContext) -> Any:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return NodeResult(output=count, action="tick")

    flow = (
        Flow("ticks").node("tick", tick)
        .loop("again", start_node_id="tick", end_node_id="tick", condition="count < 2")
    )
    async with FlowRuntime(registry=flow.registry()).stepper(flow.to_blueprint()) as stepper:
        steps = []
        while (step := await stepper.next()) is not None:
            steps.append((step.node_id, step.action))

    assert steps == [("tick", "tick"), ("again", "continue"), ("tick", "tick"), ("again", "break")]


async def test_closing_an_unfinished_stepper_cancels_the_run() -> None:
    ran: list[str] = []
    flow = Flow("two").node("a", lambda ctx: ran.append("a")).node(
        "b", lambda ctx: ran.append("b")).edge("a", "b")
    stepper = FlowRuntime(registry=flow.registry()).stepper(flow.to_blueprint())
    await stepper.next()
    await stepper.close()

    assert ran == ["a"]
    assert stepper.result is not None and stepper.result.status == "cancelled"
    assert await stepper.next() is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=dag_edges(max_nodes=12), conditions=st.lists(st.sampled_from(
    [None, "result.output % 2 == 0", "result.output % 3 != 0"]), min_size=36, max_size=36))
def test_stepping_ends_exactly_like_running(
    graph: tuple[int, list[tuple[int, int]]], conditions: list[str | None]
) -> None:
    count, edges = graph
    ran: list[str] = []

    async def work(ctx: NodeContext) -> int:
        ran.append(ctx.node_id)
        incoming = ctx.input if isinstance(ctx.input, dict) else {"": ctx.input or 0}
        return (sum(incoming.values()) * 7 + int(ctx.node_id[1:])) % 11

    bp = WorkflowBlueprint.model_validate({
        "id": "random",
        "nodes": [{"id": f"n{i}", "uses": "work"} for i in range(count)],
        "edges": [{"source": f"n{a}", "target": f"n{b}",
                   **({"condition": c} if (c := conditions[i % len(conditions)]) else {})}
                  for i, (a, b) in enumerate(dict.fromkeys(edges))],
    })
    runtime = FlowRuntime(registry={"work": work})

    async def both() -> tuple[Any, Any, list[str], list[str]]:
        direct = await runtime.run(bp, run_id="same")
        ran_directly = sorted(ran)
        ran.clear()
        async with runtime.stepper(bp, run_id="same") as stepper:
            steps = []
            while (step := await stepper.next()) is not None:
                assert ran[-1] == step.node_id and len(ran) == len(steps) + 1
                steps.append(step.node_id)
        return direct, stepper.result, ran_directly, steps

    direct, stepped, ran_directly, steps = asyncio.run(both())

    assert stepped is not None
    assert (stepped.status, stepped.context) == (direct.status, direct.context)
    assert sorted(steps) == ran_directly
