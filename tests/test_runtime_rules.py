"""Execution semantics (SPEC §3 and §4): one test per rule, named after the rule."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

import flowcraft
from flowcraft import (
    BaseNode,
    BlueprintValidationError,
    CancellationSignal,
    ExpressionError,
    Flow,
    FlowcraftError,
    FlowRuntime,
    InMemoryEventBus,
    NodeContext,
    NodeResult,
    NodeTimeoutError,
    WorkflowBlueprint,
    WorkflowResult,
    analyze_blueprint,
    generate_mermaid,
)
from flowcraft.nodes.builtins import parse_duration_ms


def blueprint(raw: dict[str, Any]) -> WorkflowBlueprint:
    raw.setdefault("id", "test")
    return WorkflowBlueprint.model_validate(raw)


async def run(flow: Flow, context: dict[str, Any] | None = None, **options: Any) -> WorkflowResult:
    runtime = FlowRuntime(registry=flow.registry(), **options)
    return await runtime.run(flow.to_blueprint(), context or {})


def returning(value: Any) -> Any:
    async def node(ctx: NodeContext) -> Any:
        return value

    return node


class Recorder:
    """Node functions that log which node ran, with what input, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @property
    def order(self) -> list[str]:
        return [node_id for node_id, _ in self.calls]

    def input_of(self, node_id: str) -> Any:
        inputs = [value for called, value in self.calls if called == node_id]
        assert len(inputs) == 1, f"{node_id} ran {len(inputs)} times: {self.calls}"
        return inputs[0]

    def node(self, output: Any = None, action: str | None = None) -> Any:
        async def node(ctx: NodeContext) -> Any:
            self.calls.append((ctx.node_id, ctx.input))
            return NodeResult(output=output, action=action)

        return node

    def echo(self) -> Any:
        async def node(ctx: NodeContext) -> Any:
            self.calls.append((ctx.node_id, ctx.input))
            return ctx.input

        return node


# -- outputs, start nodes, inputs --------------------------------------------------------------


async def test_outputs_are_stored_under_outputs_node_id() -> None:
    flow = Flow("out").node("a", returning({"n": 1})).node("b", returning([2])).edge("a", "b")

    result = await run(flow)

    assert result.status == "completed"
    assert result.context["_outputs.a"] == {"n": 1}
    assert result.context["_outputs.b"] == [2]


async def test_start_nodes_exclude_fallback_only_nodes() -> None:
    calls: list[tuple[str, Any]] = []

    async def broken(ctx: NodeContext) -> Any:
        raise RuntimeError("primary down")

    async def rescue(ctx: NodeContext) -> Any:
        calls.append((ctx.node_id, dict(ctx.params)))
        return "from rescue"

    async def after(ctx: NodeContext) -> Any:
        calls.append((ctx.node_id, ctx.input))

    bp = blueprint({
        "nodes": [
            {"id": "main", "uses": "broken", "params": {"who": "main"},
             "config": {"fallback": "rescue"}},
            {"id": "rescue", "uses": "rescue", "params": {"who": "rescue"}},
            {"id": "after", "uses": "after"},
        ],
        "edges": [{"source": "main", "target": "after"}],
    })

    assert analyze_blueprint(bp).start_node_ids == ["main"]
    assert analyze_blueprint(bp).terminal_node_ids == ["after"]
    registry = {"broken": broken, "rescue": rescue, "after": after}
    result = await FlowRuntime(registry=registry).run(bp)

    assert result.status == "completed", result.errors
    # The fallback node never runs on its own; it runs once, in main's place, with its params.
    assert calls == [("main", {"who": "rescue"}), ("after", "from rescue")]
    assert result.context["_outputs.main"] == "from rescue"
    assert "_outputs.rescue" not in result.context


async def test_fallback_node_with_its_own_edges_does_not_hold_up_a_join() -> None:
    """The reference docs' fallback example: the fallback node also has an edge to the
    join; it never runs on its own, so the join must not wait for it."""
    rec = Recorder()

    async def primary(ctx: NodeContext) -> None:
        raise RuntimeError("Primary API is down")

    flow = (
        Flow("fallback-workflow")
        .node("primary-api", primary, max_retries=2, fallback="secondary-api")
        .node("secondary-api", returning("Data from secondary API"))
        .node("process-data", rec.echo())
        .edge("primary-api", "process-data").edge("secondary-api", "process-data")
    )

    result = await run(flow)

    assert result.status == "completed", result.errors
    assert rec.input_of("process-data") == "Data from secondary API"


async def test_cycle_entry_points_start_a_pure_cycle() -> None:
    order: list[tuple[str, Any]] = []

    async def increment(ctx: NodeContext) -> int:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        order.append(("increment", count))
        return count

    async def check(ctx: NodeContext) -> NodeResult:
        order.append(("check", ctx.input))
        return NodeResult(output=ctx.input, action="again")

    raw = {
        "id": "cycle",
        "nodes": [{"id": "check", "uses": "check", "inputs": "increment"},
                  {"id": "increment", "uses": "increment"}],
        "edges": [{"source": "increment", "target": "check"},
                  {"source": "check", "target": "increment", "action": "again",
                   "condition": "(count or 0) < 3"}],
    }
    runtime = FlowRuntime(registry={"increment": increment, "check": check})

    with_entry = blueprint({**raw, "metadata": {"cycleEntryPoints": ["increment"]}})
    assert analyze_blueprint(with_entry).start_node_ids == ["increment"]
    result = await runtime.run(with_entry)
    assert result.status == "completed", result.errors
    assert order == [("increment", 1), ("check", 1), ("increment", 2), ("check", 2),
                     ("increment", 3), ("check", 3)]

    # Without entry points the first node of each cycle starts it.
    order.clear()
    assert analyze_blueprint(blueprint(dict(raw))).start_node_ids == ["check"]
    result = await runtime.run(blueprint(dict(raw)))
    assert result.status == "completed", result.errors
    assert order[:2] == [("check", None), ("increment", 1)]


async def test_input_string_reads_context_key_with_underscore() -> None:
    rec = Recorder()
    flow = (
        Flow("under")
        .node("x", returning("output of node x"))
        .node("reader", rec.echo(), inputs="_x")
        .edge("x", "reader")
    )

    result = await run(flow, {"_x": "context key _x", "x": "context key x"})

    assert result.status == "completed"
    assert rec.input_of("reader") == "context key _x"
    assert "_inputs.reader" not in result.context  # explicit inputs are not edge deliveries


async def test_input_dotted_path_reads_node_output_property() -> None:
    rec = Recorder()
    flow = (
        Flow("dotted")
        .node("src", returning({"user": {"name": "ada", "tags": ["x", "y"]}}))
        .node("name", rec.echo(), inputs="src.user.name")
        .node("tag", rec.echo(), inputs="src.user.tags.1")
        .node("gone", rec.echo(), inputs="src.user.missing")
        .edge("src", "name").edge("src", "tag").edge("src", "gone")
    )

    await run(flow)

    assert rec.input_of("name") == "ada"
    assert rec.input_of("tag") == "y"
    assert rec.input_of("gone") is None


async def test_input_mapping_resolves_each_entry() -> None:
    rec = Recorder()
    flow = (
        Flow("mapping")
        .node("src", returning({"x": 1}))
        .node("reader", rec.echo(), inputs={
            "whole": "src", "part": "src.x", "plain": "plain", "under": "_under",
            "missing": "nothing_here",
        })
        .edge("src", "reader")
    )

    # "src" names a node with an output, so its output wins over the context key "src".
    await run(flow, {"plain": 2, "_under": 3, "src": "context value"})

    assert rec.input_of("reader") == {
        "whole": {"x": 1}, "part": 1, "plain": 2, "under": 3, "missing": None,
    }


async def test_input_without_inputs_is_edge_delivery_or_transform() -> None:
    rec = Recorder()
    flow = (
        Flow("deliver")
        .node("a", returning(21))
        .node("plain", rec.echo())
        .node("doubled", rec.echo())
        .edge("a", "plain")
        .edge("a", "doubled", transform="input * 2")
        .node("solo", rec.echo())
    )

    result = await run(flow)

    assert rec.input_of("plain") == 21
    assert rec.input_of("doubled") == 42
    assert result.context["_inputs.plain"] == 21
    assert result.context["_inputs.doubled"] == 42
    assert rec.input_of("solo") is None  # a start node gets nothing delivered


async def test_all_join_input_is_mapping_of_delivering_predecessors() -> None:
    rec = Recorder()
    flow = (
        Flow("all-input")
        .node("a", returning("A")).node("b", returning("B")).node("c", returning("C"))
        .node("j", rec.echo())
        .edge("a", "j").edge("b", "j", transform="input + '!'")
        .edge("c", "j", condition="result.output == 'nope'")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert rec.input_of("j") == {"a": "A", "b": "B!"}
    assert result.context["_inputs.j"] == {"a": "A", "b": "B!"}


async def test_any_join_input_is_first_arrival() -> None:
    rec = Recorder()
    first_done = asyncio.Event()

    async def fast(ctx: NodeContext) -> str:
        first_done.set()
        return "fast"

    async def slow(ctx: NodeContext) -> str:
        await first_done.wait()
        await asyncio.sleep(0.01)
        return "slow"

    flow = (
        Flow("any-input")
        .node("slow", slow).node("fast", fast)
        .node("j", rec.echo(), join_strategy="any")
        .edge("slow", "j").edge("fast", "j")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert rec.input_of("j") == "fast"
    assert result.context["_inputs.j"] == "fast"


# -- routing ------------------------------------------------------------------------------------


async def test_routing_action_edges_then_default_edges() -> None:
    async def taken_by(action: str | None, output: Any = 1) -> set[str]:
        rec = Recorder()
        flow = (
            Flow("route")
            .node("r", rec.node(output=output, action=action))
            .node("on_x", rec.node()).node("on_x_big", rec.node())
            .node("on_y", rec.node()).node("default", rec.node())
            .node("default_big", rec.node())
            .edge("r", "on_x", action="x")
            .edge("r", "on_x_big", action="x", condition="result.output > 5")
            .edge("r", "on_y", action="y", condition="result.output > 5")
            .edge("r", "default")
            .edge("r", "default_big", condition="result.output > 5")
        )
        result = await run(flow)
        assert result.status == "completed", result.errors
        return set(rec.order) - {"r"}

    assert await taken_by("x") == {"on_x"}
    assert await taken_by("x", output=9) == {"on_x", "on_x_big"}
    # No edge with the action is taken: the edges without an action are.
    assert await taken_by("y") == {"default"}
    assert await taken_by("y", output=9) == {"on_y"}
    assert await taken_by("unknown") == {"default"}
    assert await taken_by(None, output=9) == {"default", "default_big"}


async def test_condition_sees_identifier_keys_context_and_result() -> None:
    rec = Recorder()
    flow = (
        Flow("conditions")
        .node("a", rec.node(output={"score": 0.7}, action="go"))
        .node("by_key", rec.node()).node("by_context", rec.node())
        .node("by_result", rec.node()).node("by_action", rec.node())
        .node("by_dashed", rec.node()).node("never", rec.node())
        .edge("a", "by_key", condition="limit == 3 and user.name == 'ada'")
        .edge("a", "by_context", condition="context['_outputs.a'].score > 0.5")
        .edge("a", "by_result", condition="result.output.score > 0.5")
        .edge("a", "by_action", condition="result.action == 'go'")
        .edge("a", "by_dashed", condition="context['my-key'] == 'dash'")
        .edge("a", "never", condition="limit > 3")
    )

    result = await run(flow, {"limit": 3, "user": {"name": "ada"}, "my-key": "dash"})

    assert result.status == "completed", result.errors
    assert set(rec.order) == {"a", "by_key", "by_context", "by_result", "by_action", "by_dashed"}


async def test_transform_sees_input_and_context() -> None:
    rec = Recorder()
    flow = (
        Flow("transform")
        .node("a", returning({"items": [1, 2, 3], "keys": "not a method"}))
        .node("items", rec.echo()).node("offset", rec.echo())
        .edge("a", "items", transform="input.items")
        .edge("a", "offset", transform="len(input.items) + context['offset'] + context.base")
    )

    result = await run(flow, {"offset": 10, "base": 100})

    assert result.status == "completed", result.errors
    assert rec.input_of("items") == [1, 2, 3]
    assert rec.input_of("offset") == 113


# -- joins and skips -------------------------------------------------------------------------


async def test_all_join_waits_for_every_predecessor() -> None:
    rec = Recorder()

    async def slow(ctx: NodeContext) -> str:
        await asyncio.sleep(0.03)
        rec.calls.append(("slow", None))
        return "S"

    flow = (
        Flow("all")
        .node("fast", rec.node(output="F")).node("slow", slow)
        .node("j", rec.echo())
        .edge("fast", "j").edge("slow", "j")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert rec.order == ["fast", "slow", "j"]
    assert rec.input_of("j") == {"fast": "F", "slow": "S"}


async def test_any_join_runs_once_on_first_arrival() -> None:
    rec = Recorder()
    joined = asyncio.Event()

    async def joiner(ctx: NodeContext) -> Any:
        rec.calls.append((ctx.node_id, ctx.input))
        joined.set()
        return ctx.input

    async def late(ctx: NodeContext) -> str:
        await joined.wait()  # arrives only after the join has completed
        rec.calls.append(("late", None))
        return "late"

    async def late_untaken(ctx: NodeContext) -> str:
        await joined.wait()
        return "late"

    flow = (
        Flow("any")
        .node("early", rec.node(output="early")).node("late", late)
        .node("untaken", late_untaken)
        .node("j", joiner, join_strategy="any").node("after", rec.echo())
        .edge("early", "j").edge("late", "j")
        .edge("untaken", "j", condition="result.output == 'never'")
        .edge("j", "after")
    )

    result = await run(flow)

    assert result.status == "completed", result.errors
    assert rec.order.count("j") == 1
    assert rec.order.count("after") == 1
    assert rec.input_of("j") == "early"
    assert rec.order.index("j") < rec.order.index("late")


async def test_any_join_skips_only_when_no_predecessor_delivers() -> None:
    rec = Recorder()
    flow = (
        Flow("any-skip")
        .node("a", rec.node(output=1)).node("b", rec.node(output=2))
        .node("some", rec.echo(), join_strategy="any")
        .node("none", rec.echo(), join_strategy="any")
        .edge("a", "some", condition="result.output > 5").edge("b", "some")
        .edge("a", "none", condition="result.output > 5")
        .edge("b", "none", condition="result.output > 5")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert rec.input_of("some") == 2
    assert "none" not in rec.order


async def test_diamond_with_untaken_branch_converges() -> None:
    rec = Recorder()
    bus = InMemoryEventBus()
    flow = (
        Flow("diamond")
        .node("a", rec.node(output=1))
        .node("b", rec.node(output="B")).node("b2", rec.node(output="B2"))
        .node("c", rec.node(output="C"))
        .node("d", rec.echo()).node("e", rec.echo())
        .edge("a", "b", condition="result.output > 1")
        .edge("b", "b2").edge("b2", "d")
        .edge("a", "c").edge("c", "d").edge("d", "e")
    )

    result = await run(flow, event_bus=bus)

    assert result.status == "completed"
    assert rec.order == ["a", "c", "d", "e"]
    assert rec.input_of("d") == {"c": "C"}
    assert {e.payload["nodeId"] for e in bus.of_type("node:skipped")} == {"b", "b2"}


async def test_join_whose_predecessors_are_all_skipped_is_skipped() -> None:
    rec = Recorder()
    bus = InMemoryEventBus()
    flow = (
        Flow("all-skipped")
        .node("a", rec.node(output=0))
        .node("b", rec.node()).node("c", rec.node())
        .node("d", rec.node(), join_strategy="all").node("e", rec.node())
        .edge("a", "b", condition="result.output > 0")
        .edge("a", "c", condition="result.output > 0")
        .edge("b", "d").edge("c", "d").edge("d", "e")
    )

    result = await run(flow, event_bus=bus)

    assert result.status == "completed"
    assert rec.order == ["a"]
    assert "_outputs.d" not in result.context
    assert {e.payload["nodeId"] for e in bus.of_type("node:skipped")} == {"b", "c", "d", "e"}


async def test_join_counts_each_predecessor_once() -> None:
    """Found by the property tests: a predecessor skipped before the join's first arrival
    was counted twice (once from its record, once by its own arrival), so the join was
    skipped before its last predecessor delivered."""
    rec = Recorder()
    flow = (
        Flow("count-once")
        .node("a", rec.node(output="A", action="y"))
        .node("b", rec.node(output="B")).node("c", rec.node(output="C"))
        .node("j", rec.echo())
        .edge("a", "b").edge("a", "j").edge("a", "c", action="y")
        .edge("b", "j").edge("c", "j")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert rec.order == ["a", "c", "j"]
    assert rec.input_of("j") == {"c": "C"}


# -- retries, timeouts, fallbacks, failures --------------------------------------------------


async def test_max_retries_is_total_attempts() -> None:
    attempts: list[int] = []

    async def flaky(ctx: NodeContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("try again")
        return "ok"

    async def broken(ctx: NodeContext) -> str:
        attempts.append(ctx.attempt)
        raise ConnectionError("always")

    result = await run(Flow("retry").node("n", flaky, max_retries=3))
    assert result.status == "completed"
    assert attempts == [1, 2]

    attempts.clear()
    bus = InMemoryEventBus()
    result = await run(Flow("retry").node("n", broken, max_retries=3), event_bus=bus)
    assert result.status == "failed"
    assert attempts == [1, 2, 3]
    assert result.errors[0].attempt == 3
    assert [e.payload["attempt"] for e in bus.of_type("node:retry")] == [1, 2]

    attempts.clear()
    result = await run(Flow("once").node("n", broken))
    assert attempts == [1]  # the default is one attempt


async def test_retry_delay_between_attempts() -> None:
    stamps: list[float] = []

    async def broken(ctx: NodeContext) -> None:
        stamps.append(time.monotonic())
        raise ConnectionError("down")

    await run(Flow("delay").node("n", broken, max_retries=3, retry_delay=40))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == 2
    assert all(gap >= 0.035 for gap in gaps), gaps

    stamps.clear()
    await run(Flow("backoff").node("n", broken, max_retries=3, retry_delay=30,
                                   retry_backoff="exponential"))
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.055, gaps


async def test_timeout_cancels_the_attempt() -> None:
    cancelled: list[int] = []

    async def hangs(ctx: NodeContext) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)
            raise

    started = time.monotonic()
    result = await run(Flow("timeout").node("n", hangs, timeout=30, max_retries=2))
    assert time.monotonic() - started < 2
    assert result.status == "failed"
    assert cancelled == [1, 2]
    assert "timed out" in result.errors[0].message
    assert result.errors[0].error_type == "NodeTimeoutError"

    # A plain def node runs in a thread: it sees its attempt's signal set, and the next
    # attempt starts with a fresh signal.
    seen: list[tuple[int, bool]] = []

    def cooperative(ctx: NodeContext) -> str:
        seen.append((ctx.attempt, ctx.signal.is_set()))
        if ctx.attempt == 1:
            deadline = time.monotonic() + 2
            while not ctx.signal.is_set() and time.monotonic() < deadline:
                time.sleep(0.002)
            seen.append((ctx.attempt, ctx.cancelled))
            return "too late"
        return "in time"

    result = await run(Flow("cooperative").node("n", cooperative, timeout=30, max_retries=2))
    assert result.status == "completed", result.errors
    assert result.context["_outputs.n"] == "in time"
    for _ in range(200):  # the abandoned thread reports back shortly after its timeout
        if len(seen) == 3:
            break
        await asyncio.sleep(0.005)
    assert sorted(seen) == [(1, False), (1, True), (2, False)]


async def test_fallback_output_becomes_node_output_and_routing_continues() -> None:
    rec = Recorder()
    bus = InMemoryEventBus()
    calls: list[int] = []

    async def broken(ctx: NodeContext) -> None:
        calls.append(ctx.attempt)
        raise ValueError("primary failed")

    async def fallback(ctx: NodeContext) -> NodeResult:
        return NodeResult(output={"cached": True}, action="degraded")

    flow = (
        Flow("fallback")
        .node("fetch", broken, max_retries=2, fallback=fallback)
        .node("normal", rec.echo()).node("degraded", rec.echo())
        .edge("fetch", "normal", action="fresh").edge("fetch", "degraded", action="degraded")
    )

    result = await run(flow, event_bus=bus)

    assert result.status == "completed", result.errors
    assert calls == [1, 2]
    assert result.context["_outputs.fetch"] == {"cached": True}
    assert rec.calls == [("degraded", {"cached": True})]
    assert result.errors == []
    [event] = bus.of_type("node:fallback")
    assert event.payload["nodeId"] == "fetch"


async def test_failure_without_fallback_fails_run_and_successors_never_run() -> None:
    rec = Recorder()

    async def broken(ctx: NodeContext) -> None:
        raise ValueError(f"card declined on attempt {ctx.attempt}")

    flow = (
        Flow("fail")
        .node("charge", broken, max_retries=2)
        .node("ship", rec.node()).node("notify", rec.node())
        .edge("charge", "ship").edge("ship", "notify")
    )

    result = await run(flow)

    assert result.status == "failed"
    assert rec.calls == []
    [error] = result.errors
    assert error.node_id == "charge"
    assert error.attempt == 2
    assert error.error_type == "ValueError"
    assert "card declined on attempt 2" in error.message
    assert error.run_id == result.run_id
    assert error.to_dict()["nodeId"] == "charge"
    assert "_outputs.ship" not in result.context


async def test_result_statuses() -> None:
    completed = await run(Flow("ok").node("a", returning(1)))
    assert completed.status == "completed"
    assert completed.errors == []
    assert completed.run_id

    async def broken(ctx: NodeContext) -> None:
        raise RuntimeError("bad")

    assert (await run(Flow("bad").node("a", broken))).status == "failed"
    assert (await run(Flow("wait").wait("w"))).status == "awaiting"

    signal = CancellationSignal()
    rec = Recorder()

    async def cancels(ctx: NodeContext) -> str:
        signal.set()
        return "done"

    flow = Flow("cancel").node("a", cancels).node("b", rec.node()).edge("a", "b")
    cancelled = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint(),
                                                                 signal=signal)
    assert cancelled.status == "cancelled"
    assert rec.calls == []


async def test_cancellation_stops_in_flight_nodes() -> None:
    signal = CancellationSignal()
    cancelled: list[str] = []
    seen_in_thread = threading.Event()
    rec = Recorder()

    hanging = asyncio.Event()

    async def hangs(ctx: NodeContext) -> None:
        hanging.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(ctx.node_id)
            raise

    def polls(ctx: NodeContext) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if ctx.signal.is_set():
                seen_in_thread.set()
                return
            time.sleep(0.002)

    async def cancel_soon() -> None:
        await hanging.wait()
        signal.set()

    flow = (
        Flow("cancel-in-flight")
        .node("hangs", hangs).node("polls", polls).node("after", rec.node())
        .edge("hangs", "after").edge("polls", "after")
    )
    canceller = asyncio.create_task(cancel_soon())
    started = time.monotonic()
    result = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint(), signal=signal)
    await canceller

    assert result.status == "cancelled"
    assert time.monotonic() - started < 2
    assert cancelled == ["hangs"]
    assert await asyncio.to_thread(seen_in_thread.wait, 2)
    assert rec.calls == []


async def test_cancellation_signal_reaches_children_not_parents() -> None:
    run_signal = CancellationSignal()
    attempt_one, attempt_two = CancellationSignal(run_signal), CancellationSignal(run_signal)
    fired: list[str] = []
    run_signal.add_callback(lambda: fired.append("run"))

    attempt_one.set()  # a timeout of one attempt
    assert attempt_one.is_set()
    assert not run_signal.is_set() and not attempt_two.is_set()

    waiter = asyncio.create_task(attempt_two.wait())
    await asyncio.sleep(0)
    canceller = threading.Thread(target=run_signal.set)  # cancelling the run, from any thread
    canceller.start()
    await asyncio.wait_for(waiter, timeout=2)
    await asyncio.to_thread(canceller.join, 2)
    assert attempt_two.is_set() and fired == ["run"]
    assert CancellationSignal(run_signal).is_set()  # later attempts start cancelled


# -- awaiting -----------------------------------------------------------------------------------


async def test_wait_parks_run_and_resume_action_routes() -> None:
    rec = Recorder()
    flow = (
        Flow("approval")
        .node("start", returning("draft"))
        .wait("review", prompt="approve?")
        .node("side", rec.node(output="side"))
        .node("publish", rec.echo()).node("discard", rec.echo())
        .node("join", rec.echo())
        .edge("start", "review").edge("start", "side")
        .edge("review", "publish", action="approve").edge("review", "discard", action="reject")
        .edge("publish", "join").edge("discard", "join").edge("side", "join")
    )
    bp = flow.to_blueprint()
    runtime = FlowRuntime(registry=flow.registry())

    parked = await runtime.run(bp)

    assert parked.status == "awaiting"
    assert parked.context["_awaitingNodeIds"] == ["review"]
    assert parked.context["_awaitingDetails"]["review"]["prompt"] == "approve?"
    assert rec.order == ["side"]

    approved = await runtime.resume(bp, parked.serialized_context,
                                    {"output": "looks good", "action": "approve"})
    assert approved.status == "completed", approved.errors
    assert approved.context["_outputs.review"] == "looks good"
    assert "_awaitingNodeIds" not in approved.context
    assert rec.order == ["side", "publish", "join"]
    assert rec.input_of("publish") == "looks good"
    assert rec.input_of("join") == {"publish": "looks good", "side": "side"}

    rec.calls.clear()
    rejected = await runtime.resume(bp, parked.serialized_context, {"action": "reject"})
    assert rejected.status == "completed"
    assert rec.order == ["discard", "join"]

    with pytest.raises(FlowcraftError, match="not awaiting"):
        await runtime.resume(bp, approved.serialized_context, {"action": "approve"})


async def test_long_sleep_parks_with_timer() -> None:
    rec = Recorder()
    flow = Flow("nap").node("a", returning("carried")).sleep("nap", "1s").node("b", rec.echo())
    flow.edge("a", "nap").edge("nap", "b")
    runtime = FlowRuntime(registry=flow.registry(), max_inline_sleep_seconds=0.01)
    before = datetime.now(UTC)

    parked = await runtime.run(flow.to_blueprint())

    assert parked.status == "awaiting"
    assert parked.context["_awaitingNodeIds"] == ["nap"]
    details = parked.context["_awaitingDetails"]["nap"]
    assert details["reason"] == "timer"
    wake_up = datetime.fromisoformat(details["wakeUpAt"])
    assert 0.9 <= (wake_up - before).total_seconds() <= 5
    assert rec.calls == []

    resumed = await runtime.resume(flow.to_blueprint(), parked.serialized_context,
                                   {"output": "carried"})
    assert resumed.status == "completed"
    assert rec.input_of("b") == "carried"

    # A short sleep runs inline and passes its input through.
    rec.calls.clear()
    inline = await run(Flow("short").node("a", returning(5)).sleep("nap", 5).node("b", rec.echo())
                       .edge("a", "nap").edge("nap", "b"))
    assert inline.status == "completed"
    assert rec.input_of("b") == 5


async def test_sleep_and_subflow_outside_an_engine_say_what_is_missing() -> None:
    from flowcraft.context import TrackedContext
    from flowcraft.nodes.builtins import sleep_node, subflow_node

    def context(node_id: str, params: dict[str, Any]) -> NodeContext:
        return NodeContext(context=TrackedContext({}), input=None, params=params,
                           dependencies={}, run_id="r", node_id=node_id, blueprint_id="b")

    with pytest.raises(FlowcraftError, match="node 'nap' needs the engine for a sleep"):
        await sleep_node(context("nap", {"duration": "2s"}))
    with pytest.raises(FlowcraftError, match="node 'child' needs the engine for a subflow"):
        await subflow_node(context("child", {"blueprintId": "other"}))


# -- events, expressions, execution ---------------------------------------------------------


async def test_events_emitted() -> None:
    bus = InMemoryEventBus()

    async def flaky(ctx: NodeContext) -> int:
        if ctx.attempt == 1:
            raise ConnectionError("blip")
        await ctx.context.set("written", True)
        return 1

    async def broken(ctx: NodeContext) -> None:
        raise RuntimeError("gone")

    flow = (
        Flow("events")
        .node("flaky", flaky, max_retries=2)
        .node("saved", broken, fallback=returning("rescued"))
        .node("skipped", returning(None))
        .node("fails", broken)
        .edge("flaky", "saved").edge("flaky", "skipped", condition="result.output > 5")
        .edge("saved", "fails")
    )

    result = await run(flow, event_bus=bus)

    assert result.status == "failed"
    types = {event.type for event in bus.history}
    assert types == {
        "workflow:start", "workflow:finish", "node:start", "node:finish", "node:error",
        "node:retry", "node:fallback", "node:skipped", "edge:evaluate", "context:change",
    }
    assert bus.history[0].type == "workflow:start"
    assert bus.history[-1].type == "workflow:finish"
    assert bus.history[-1].payload["status"] == "failed"
    assert all(event.payload["runId"] == result.run_id for event in bus.history)
    by_type = {t: [e.payload for e in bus.of_type(t)] for t in types}
    assert [p["nodeId"] for p in by_type["node:start"]] == ["flaky", "saved", "fails"]
    assert by_type["node:skipped"] == [{"runId": result.run_id, "nodeId": "skipped"}]
    assert by_type["node:error"][0]["nodeId"] == "fails"
    [evaluated] = by_type["edge:evaluate"]
    assert (evaluated["source"], evaluated["target"], evaluated["result"]) == (
        "flaky", "skipped", False)
    assert {(p["nodeId"], p["key"]) for p in by_type["context:change"]} >= {("flaky", "written")}


async def test_broken_event_listener_never_breaks_a_run() -> None:
    bus = InMemoryEventBus()

    def explode(event: Any) -> None:
        raise RuntimeError("listener bug")

    bus.subscribe(explode)
    result = await run(Flow("l").node("a", returning(1)), event_bus=bus)

    assert result.status == "completed"


async def test_expression_errors_name_the_edge() -> None:
    rec = Recorder()
    bad_condition = (
        Flow("bad-condition")
        .node("a", returning(1)).node("b", rec.node())
        .edge("a", "b", condition="result.output.total > len(result.output)")
    )
    result = await run(bad_condition)
    assert result.status == "failed"
    assert rec.calls == []
    [error] = result.errors
    assert "a -> b" in error.message
    assert "condition" in error.message

    unsafe_transform = (
        Flow("bad-transform")
        .node("a", returning(1)).node("b", rec.node())
        .edge("a", "b", transform="input + 'x'")
    )
    result = await run(unsafe_transform)
    assert result.status == "failed"
    assert rec.calls == []
    [error] = result.errors
    assert "a -> b" in error.message
    assert "transform" in error.message
    assert error.error_type == "ExpressionError"

    # The same error on the edges of a resumed wait node fails the run too (no exception).
    waiting = Flow("bad-resume").wait("w").node("b", rec.node())
    waiting.edge("w", "b", condition="len(result.output) > 0")
    runtime = FlowRuntime(registry=waiting.registry())
    parked = await runtime.run(waiting.to_blueprint())
    result = await runtime.resume(waiting.to_blueprint(), parked.serialized_context, {})
    assert result.status == "failed"
    assert rec.calls == []
    assert "w -> b" in result.errors[0].message


async def test_plain_def_nodes_run_off_the_event_loop() -> None:
    def blocking(ctx: NodeContext) -> str:
        time.sleep(0.3)
        ctx.context.sync.set(f"done_{ctx.node_id}", True)
        return ctx.context.sync.get("greeting")

    flow = Flow("threads").node("one", blocking).node("two", blocking)
    started = time.monotonic()

    result = await run(flow, {"greeting": "hi"})

    assert time.monotonic() - started < 0.5
    assert result.status == "completed"
    assert result.context["_outputs.one"] == result.context["_outputs.two"] == "hi"
    assert result.context["done_one"] and result.context["done_two"]


async def test_concurrency_option_limits_parallel_nodes() -> None:
    running = 0
    peak = 0

    async def work(ctx: NodeContext) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1

    flow = Flow("wide")
    for index in range(6):
        flow.node(f"n{index}", work)
    runtime = FlowRuntime(registry=flow.registry())

    assert (await runtime.run(flow.to_blueprint(), concurrency=2)).status == "completed"
    assert peak == 2
    peak = 0
    assert (await runtime.run(flow.to_blueprint())).status == "completed"
    assert peak == 6


async def test_base_node_phases_and_only_exec_is_retried() -> None:
    phases: list[tuple[str, int]] = []

    class Charge(BaseNode):
        async def prep(self, ctx: NodeContext) -> Any:
            phases.append(("prep", ctx.attempt))
            return {"amount": self.params["amount"], "node": self.node_id}

        async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
            phases.append(("exec", ctx.attempt))
            if ctx.attempt < 3:
                raise ConnectionError("gateway")
            return prep_result["amount"] * 2

        async def post(self, exec_result: Any, ctx: NodeContext) -> Any:
            phases.append(("post", ctx.attempt))
            return NodeResult(output=exec_result, action="charged")

    rec = Recorder()
    flow = (
        Flow("phases")
        .node("charge", Charge, params={"amount": 21}, max_retries=3)
        .node("next", rec.echo()).edge("charge", "next", action="charged")
    )

    result = await run(flow)

    assert result.status == "completed", result.errors
    assert phases == [("prep", 1), ("exec", 1), ("exec", 2), ("exec", 3), ("post", 3)]
    assert rec.input_of("next") == 42

    class Guarded(BaseNode):
        async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
            raise ValueError("no")

        async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
            return f"recovered from {error}"

    result = await run(Flow("guarded").node("g", Guarded, max_retries=2))
    assert result.status == "completed"
    assert result.context["_outputs.g"] == "recovered from no"


async def test_node_result_used_as_is_other_values_wrapped() -> None:
    rec = Recorder()

    async def as_result(ctx: NodeContext) -> NodeResult:
        return NodeResult(output=1, action="go")

    async def as_dict(ctx: NodeContext) -> dict[str, Any]:
        return {"output": 2, "action": "go"}

    def plain_none(ctx: NodeContext) -> None:
        return None

    flow = (
        Flow("wrap")
        .node("result", as_result).node("dict", as_dict).node("none", plain_none)
        .node("go_from_result", rec.echo()).node("default_from_result", rec.echo())
        .node("go_from_dict", rec.echo()).node("default_from_dict", rec.echo())
        .edge("result", "go_from_result", action="go").edge("result", "default_from_result")
        .edge("dict", "go_from_dict", action="go").edge("dict", "default_from_dict")
    )

    result = await run(flow)

    assert result.status == "completed"
    assert result.context["_outputs.result"] == 1
    assert result.context["_outputs.dict"] == {"output": 2, "action": "go"}
    assert "_outputs.none" in result.context and result.context["_outputs.none"] is None
    assert set(rec.order) == {"go_from_result", "default_from_dict"}


async def test_dependencies_and_node_context_fields_reach_the_node() -> None:
    seen: dict[str, Any] = {}

    async def inspect_ctx(ctx: NodeContext) -> None:
        seen.update(db=ctx.dependencies["db"], run_id=ctx.run_id, node_id=ctx.node_id,
                    params=dict(ctx.params), attempt=ctx.attempt, iteration=ctx.iteration,
                    key=ctx.idempotency_key, blueprint=ctx.blueprint_id)

    flow = Flow("ctx").node("probe", inspect_ctx, params={"p": 1})
    runtime = FlowRuntime(registry=flow.registry(), dependencies={"db": "fake-db"})
    result = await runtime.run(flow.to_blueprint(), run_id="run-1")

    assert result.run_id == "run-1"
    assert seen == {"db": "fake-db", "run_id": "run-1", "node_id": "probe", "params": {"p": 1},
                    "attempt": 1, "iteration": 0, "key": "run-1:probe:0", "blueprint": "ctx"}


# -- built-in nodes ---------------------------------------------------------------------------


def math_child() -> Flow:
    async def add(ctx: NodeContext) -> int:
        return await ctx.context.get("a") + await ctx.context.get("b")

    return Flow("math").node("add", add)


async def test_subflow_inputs_and_outputs_mappings() -> None:
    child = math_child()

    async def prepare(ctx: NodeContext) -> int:
        await ctx.context.set("val1", 10)
        return 20

    rec = Recorder()
    parent = (
        Flow("parent")
        .node("prepare", prepare)
        .subflow("run_math", "math", inputs={"a": "val1", "b": "prepare"},
                 outputs={"addition_result": "add"})
        .node("after", rec.echo())
        .edge("prepare", "run_math").edge("run_math", "after")
    )
    runtime = FlowRuntime(blueprints={"math": child.to_blueprint()},
                          registry={**child.registry(), **parent.registry()})

    result = await runtime.run(parent.to_blueprint())

    assert result.status == "completed", result.errors
    assert result.context["addition_result"] == 30
    assert result.context["_outputs.run_math"] == 30  # the child's single terminal output
    assert rec.input_of("after") == 30


async def test_subflow_without_inputs_passes_node_input_to_child_start_nodes() -> None:
    async def double(ctx: NodeContext) -> int:
        return ctx.input * 2

    async def square(ctx: NodeContext) -> int:
        return ctx.input * ctx.input

    child = Flow("pair").node("double", double).node("square", square)
    parent = (
        Flow("parent").node("seed", returning(7)).subflow("sub", "pair").edge("seed", "sub")
    )
    runtime = FlowRuntime(blueprints={"pair": child.to_blueprint()},
                          registry={**child.registry(), **parent.registry()})

    result = await runtime.run(parent.to_blueprint())

    assert result.status == "completed", result.errors
    # Two terminal nodes: the node's output maps each terminal to its output.
    assert result.context["_outputs.sub"] == {"double": 14, "square": 49}


async def test_subflow_child_failure_fails_the_node() -> None:
    async def broken(ctx: NodeContext) -> None:
        raise ValueError("child exploded")

    child = Flow("bad-child").node("boom", broken)
    rec = Recorder()
    parent = Flow("parent").subflow("sub", "bad-child").node("after", rec.node())
    parent.edge("sub", "after")
    runtime = FlowRuntime(blueprints={"bad-child": child.to_blueprint()},
                          registry={**child.registry(), **parent.registry()})

    result = await runtime.run(parent.to_blueprint())

    assert result.status == "failed"
    [error] = result.errors
    assert error.node_id == "sub"
    assert "child exploded" in error.message
    assert rec.calls == []

    unknown = Flow("parent2").subflow("sub", "no-such-blueprint")
    result = await FlowRuntime(registry=unknown.registry()).run(unknown.to_blueprint())
    assert result.status == "failed"
    assert "no-such-blueprint" in result.errors[0].message


async def test_subflow_child_awaiting_makes_parent_await_and_resume_continues() -> None:
    rec = Recorder()
    child = (
        Flow("approval").wait("ask").node("approved", rec.echo()).node("denied", rec.echo())
        .edge("ask", "approved", action="yes").edge("ask", "denied", action="no")
    )
    parent = (
        Flow("parent").subflow("sub", "approval").node("after", rec.echo()).edge("sub", "after")
    )
    runtime = FlowRuntime(blueprints={"approval": child.to_blueprint()},
                          registry={**child.registry(), **parent.registry()})
    bp = parent.to_blueprint()

    parked = await runtime.run(bp)

    assert parked.status == "awaiting"
    assert parked.context["_awaitingNodeIds"] == ["sub"]
    assert parked.context["_awaitingDetails"]["sub"]["childAwaiting"] == ["ask"]

    resumed = await runtime.resume(bp, parked.serialized_context,
                                   {"output": "ok by me", "action": "yes"})

    assert resumed.status == "completed", resumed.errors
    assert rec.order == ["approved", "after"]
    assert rec.input_of("approved") == "ok by me"
    # The child has two terminal nodes, so the node's output maps the ones that ran.
    assert resumed.context["_outputs.sub"] == {"approved": "ok by me"}
    assert not any(key.startswith("_subflowState") for key in resumed.context)


async def test_subflow_timeout_cancels_the_child_run() -> None:
    cancelled: list[str] = []

    async def hangs(ctx: NodeContext) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(ctx.node_id)
            raise

    child = Flow("slow-child").node("hang", hangs)
    bp = blueprint({"nodes": [{"id": "sub", "uses": "subflow", "config": {"timeout": 30},
                               "params": {"blueprintId": "slow-child"}}]})
    runtime = FlowRuntime(blueprints={"slow-child": child.to_blueprint()},
                          registry=child.registry())
    started = time.monotonic()

    result = await runtime.run(bp)

    assert time.monotonic() - started < 2
    assert result.status == "failed"
    assert "timed out" in result.errors[0].message
    assert cancelled == ["hang"]  # no orphaned child node keeps running


def test_sleep_durations_parsing() -> None:
    assert parse_duration_ms("5s") == 5_000
    assert parse_duration_ms("10m") == 600_000
    assert parse_duration_ms("2h") == 7_200_000
    assert parse_duration_ms("1d") == 86_400_000
    assert parse_duration_ms("250ms") == 250
    assert parse_duration_ms("1.5s") == 1_500
    assert parse_duration_ms(1500) == 1500
    assert parse_duration_ms(0.5) == 0.5
    for invalid in ("soon", "5 parsecs", "-5s", "", "s", None, True, [5], -1):
        with pytest.raises(FlowcraftError):
            parse_duration_ms(invalid, "nap")


async def test_sleep_with_invalid_duration_fails_the_node() -> None:
    result = await run(Flow("bad-sleep").sleep("nap", "whenever"))

    assert result.status == "failed"
    assert result.errors[0].node_id == "nap"
    assert "whenever" in result.errors[0].message


async def test_batch_scatter_gather_preserves_order() -> None:
    async def slow_double(ctx: NodeContext) -> int:
        await asyncio.sleep(0.005 * (5 - ctx.input))  # later items finish first
        return ctx.input * 2

    rec = Recorder()
    flow = (
        Flow("batch")
        .batch("fan", slow_double, input_key="items", output_key="doubled")
        .node("after", rec.echo())
        .edge("fan", "after")
    )

    result = await run(flow, {"items": [1, 2, 3, 4]})
    assert result.status == "completed", result.errors
    assert result.context["doubled"] == [2, 4, 6, 8]
    assert rec.input_of("after") == [2, 4, 6, 8]

    rec.calls.clear()
    empty = await run(flow, {"items": []})
    assert empty.status == "completed", empty.errors
    assert empty.context["doubled"] == []
    assert rec.input_of("after") == []

    not_a_list = await run(flow, {"items": "abc"})
    assert not_a_list.status == "failed"
    assert not_a_list.errors[0].node_id == "fan_scatter"


async def test_loop_controller_repeats_until_condition_or_max_iterations() -> None:
    bodies: list[int] = []

    async def body(ctx: NodeContext) -> int:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        bodies.append(count)
        return count

    rec = Recorder()

    def looping(condition: str, max_iterations: int | None = None) -> Flow:
        return (
            Flow("loop").node("body", body)
            .loop("ctl", start_node_id="body", end_node_id="body", condition=condition,
                  max_iterations=max_iterations)
            .node("done", rec.echo()).edge("ctl", "done")
        )

    result = await run(looping("count < 4"))
    assert result.status == "completed", result.errors
    assert bodies == [1, 2, 3, 4]
    assert rec.input_of("done") == 4

    bodies.clear()
    rec.calls.clear()
    result = await run(looping("true", max_iterations=3))
    assert result.status == "completed", result.errors
    assert bodies == [1, 2, 3]
    assert rec.input_of("done") == 3

    # A loop with no reachable exit is stopped by max_node_iterations, not run forever.
    bodies.clear()
    result = await run(looping("true"), max_node_iterations=5)
    assert result.status == "failed"
    assert len(bodies) == 5
    assert "max_node_iterations" in result.errors[0].message


def test_errors_derive_from_flowcraft_error() -> None:
    error_types = [
        getattr(flowcraft, name) for name in flowcraft.__all__
        if name.endswith("Error") and isinstance(getattr(flowcraft, name), type)
        and issubclass(getattr(flowcraft, name), BaseException)
    ]
    assert len(error_types) >= 8
    for error_type in error_types:
        assert issubclass(error_type, FlowcraftError), error_type
    assert issubclass(BlueprintValidationError, ValueError)
    assert issubclass(ExpressionError, ValueError)
    assert issubclass(NodeTimeoutError, TimeoutError)
    with pytest.raises(FlowcraftError):
        Flow("empty").to_blueprint()


def test_analyze_blueprint_reports_starts_terminals_and_cycles() -> None:
    bp = blueprint({
        "nodes": [
            {"id": "start", "uses": "x"}, {"id": "body", "uses": "x"},
            {"id": "ctl", "uses": "loop-controller", "params": {"condition": "true"}},
            {"id": "end", "uses": "x", "config": {"fallback": "spare"}},
            {"id": "spare", "uses": "x"},
        ],
        "edges": [
            {"source": "start", "target": "body"}, {"source": "body", "target": "ctl"},
            {"source": "ctl", "target": "body", "action": "continue"},
            {"source": "ctl", "target": "end", "action": "break"},
        ],
    })

    analysis = analyze_blueprint(bp)

    assert analysis.start_node_ids == ["start"]
    assert analysis.terminal_node_ids == ["end"]
    assert analysis.cycles == [["body", "ctl", "body"]]
    assert analysis.is_dag is False
    assert (analysis.node_count, analysis.edge_count) == (5, 4)
    assert analysis.to_dict()["startNodeIds"] == ["start"]

    dag = analyze_blueprint(blueprint({"nodes": [{"id": "a", "uses": "x"}]}))
    assert dag.is_dag and dag.cycles == [] and dag.start_node_ids == dag.terminal_node_ids == ["a"]


def test_generate_mermaid_shows_every_node_and_edge_label() -> None:
    bp = blueprint({
        "nodes": [{"id": "fetch", "uses": "http"}, {"id": "save", "uses": "db"},
                  {"id": "alert", "uses": "mail", "params": {"to": "ops"}}],
        "edges": [
            {"source": "fetch", "target": "save", "action": "ok", "transform": "input.body"},
            {"source": "fetch", "target": "alert", "condition": "result.output.status == \"down\""},
        ],
    })

    text = generate_mermaid(bp)

    assert text.startswith("flowchart TD")
    for node_id in ("fetch", "save", "alert"):
        assert node_id in text
    for label in ("ok", "input.body", "result.output.status == #quot;down#quot;"):
        assert label in text
    assert len([line for line in text.splitlines() if "-->" in line]) == 2
    assert '"down"' not in text  # a raw quote would end the Mermaid label
