"""The fluent builder: blueprint shapes, registry keys, errors."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import (
    BaseNode,
    BlueprintValidationError,
    Flow,
    FlowcraftError,
    FlowRuntime,
    NodeContext,
    WorkflowBlueprint,
)


async def fetch(ctx: NodeContext) -> str:
    return "fetched"


def save(ctx: NodeContext) -> str:
    return "saved"


async def rescue(ctx: NodeContext) -> str:
    return "rescued"


class Render(BaseNode):
    async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
        return "rendered"


def test_nodes_and_edges_become_a_camel_case_blueprint() -> None:
    bp = (
        Flow("orders", version="2")
        .node("fetch", fetch, params={"url": "u"}, inputs="orderId", max_retries=3,
              retry_delay=10, retry_backoff="exponential", timeout=50, fallback=rescue,
              join_strategy="any")
        .node("save", save, inputs={"order": "fetch", "who": "_user"})
        .node("render", Render)
        .edge("fetch", "save", action="ok", condition="result.output != ''",
              transform="input * 2")
        .edge("save", "render")
        .to_blueprint()
    )

    assert isinstance(bp, WorkflowBlueprint)
    assert bp.to_dict() == {
        "id": "orders",
        "metadata": {"version": "2"},
        "nodes": [
            {"id": "fetch", "uses": "orders.fetch", "params": {"url": "u"}, "inputs": "orderId",
             "config": {"maxRetries": 3, "retryDelay": 10, "retryBackoff": "exponential",
                        "timeout": 50, "fallback": "orders.fetch.fallback",
                        "joinStrategy": "any"}},
            {"id": "save", "uses": "orders.save", "inputs": {"order": "fetch", "who": "_user"}},
            {"id": "render", "uses": "orders.render"},
        ],
        "edges": [
            {"source": "fetch", "target": "save", "action": "ok",
             "condition": "result.output != ''", "transform": "input * 2"},
            {"source": "save", "target": "render"},
        ],
    }


def test_registry_holds_every_function_and_class_under_flow_dot_node() -> None:
    flow = (
        Flow("orders")
        .node("fetch", fetch, fallback=rescue)
        .node("save", save)
        .node("render", Render)
        .node("shared", "some-existing-key", fallback="another-key")
        .batch("fan", fetch, input_key="items", output_key="out")
    )

    registry = flow.registry()

    assert registry == {
        "orders.fetch": fetch, "orders.fetch.fallback": rescue, "orders.save": save,
        "orders.render": Render, "orders.fan_worker": fetch,
    }
    registry.clear()  # a copy: the flow keeps its own
    assert "orders.fetch" in flow.registry()
    shared = flow.to_blueprint().node("shared")
    assert shared.uses == "some-existing-key"
    assert shared.config is not None and shared.config.fallback == "another-key"


def test_builtin_shortcuts_write_builtin_nodes() -> None:
    bp = (
        Flow("builtins")
        .sleep("nap", "5s")
        .wait("approval", prompt="ok?")
        .wait("plain")
        .subflow("child", "child-bp", inputs={"a": "val"}, outputs={"res": "add"})
        .subflow("bare", "child-bp")
        .to_blueprint()
    )

    assert [n.to_dict() for n in bp.nodes] == [
        {"id": "nap", "uses": "sleep", "params": {"duration": "5s"}},
        {"id": "approval", "uses": "wait", "params": {"prompt": "ok?"}},
        {"id": "plain", "uses": "wait"},
        {"id": "child", "uses": "subflow", "params": {
            "blueprintId": "child-bp", "inputs": {"a": "val"}, "outputs": {"res": "add"}}},
        {"id": "bare", "uses": "subflow", "params": {"blueprintId": "child-bp"}},
    ]


def test_batch_rewires_edges_to_scatter_and_gather() -> None:
    bp = (
        Flow("b")
        .node("load", fetch)
        .batch("fan", save, input_key="items", output_key="results")
        .node("report", fetch)
        .batch("again", save, input_key="results", output_key="twice")
        .edge("load", "fan").edge("fan", "report").edge("fan", "again")
        .to_blueprint()
    )

    nodes = {n.id: n.to_dict() for n in bp.nodes}
    assert nodes["fan_scatter"] == {
        "id": "fan_scatter", "uses": "batch-scatter", "inputs": "items",
        "params": {"workerUsesKey": "b.fan_worker", "outputKey": "results",
                   "gatherNodeId": "fan_gather"},
    }
    assert nodes["fan_gather"] == {
        "id": "fan_gather", "uses": "batch-gather",
        "params": {"outputKey": "results", "gatherNodeId": "fan_gather"},
        "config": {"joinStrategy": "all"},
    }
    assert "fan" not in nodes
    assert [(e.source, e.target) for e in bp.edges] == [
        ("fan_scatter", "fan_gather"),
        ("again_scatter", "again_gather"),
        ("load", "fan_scatter"),
        ("fan_gather", "report"),
        ("fan_gather", "again_scatter"),
    ]


def test_loop_adds_controller_edges_and_exits_get_break() -> None:
    bp = (
        Flow("l")
        .node("body", fetch)
        .loop("ctl", start_node_id="body", end_node_id="body", condition="count < 3",
              max_iterations=10)
        .node("done", save).node("audit", save).node("special", save)
        .edge("ctl", "done")
        .edge("ctl", "audit")
        .edge("ctl", "special", action="custom")
        .to_blueprint()
    )

    assert bp.node("ctl").to_dict() == {
        "id": "ctl", "uses": "loop-controller",
        "params": {"condition": "count < 3", "maxIterations": 10},
    }
    assert [(e.source, e.target, e.action) for e in bp.edges] == [
        ("body", "ctl", None),
        ("ctl", "body", "continue"),
        ("ctl", "done", "break"),
        ("ctl", "audit", "break"),
        ("ctl", "special", "custom"),  # an explicit action is kept
    ]


def test_loop_around_a_batch_uses_the_rewired_ids() -> None:
    bp = (
        Flow("lb")
        .batch("fan", save, input_key="items", output_key="out")
        .loop("ctl", start_node_id="fan", end_node_id="fan", condition="false")
        .to_blueprint()
    )

    assert [(e.source, e.target, e.action) for e in bp.edges] == [
        ("fan_scatter", "fan_gather", None),
        ("fan_gather", "ctl", None),
        ("ctl", "fan_scatter", "continue"),
    ]


def test_cycle_entry_points_go_to_metadata() -> None:
    bp = (
        Flow("c").node("a", fetch).node("b", fetch).edge("a", "b").edge("b", "a")
        .set_cycle_entry_point("b").to_blueprint()
    )

    assert bp.metadata is not None
    assert bp.metadata.cycle_entry_points == ["b"]
    assert bp.to_dict()["metadata"] == {"cycleEntryPoints": ["b"]}


def test_to_blueprint_can_be_called_again_and_gives_the_same_blueprint() -> None:
    flow = (
        Flow("again").node("a", fetch)
        .loop("ctl", start_node_id="a", end_node_id="a", condition="false")
        .batch("fan", save, input_key="i", output_key="o").edge("ctl", "fan")
    )

    first = flow.to_blueprint()
    second = flow.to_blueprint()

    assert first == second
    assert first.to_dict() == second.to_dict()


def test_flow_errors() -> None:
    with pytest.raises(FlowcraftError, match="no nodes"):
        Flow("empty").to_blueprint()
    with pytest.raises(FlowcraftError, match="'bad'"):
        Flow("f").node("bad", 42)  # type: ignore[arg-type]
    with pytest.raises(FlowcraftError, match="fallback"):
        Flow("f").node("a", fetch, fallback=3.5)

    with pytest.raises(BlueprintValidationError) as info:
        Flow("f").node("a", fetch).node("a", save).edge("a", "ghost").to_blueprint()
    problems = info.value.problems
    assert any("duplicate" in p and "'a'" in p for p in problems)
    assert any("ghost" in p for p in problems)

    with pytest.raises(BlueprintValidationError, match="joinStrategy"):
        Flow("f").node("a", fetch, join_strategy="some").to_blueprint()
    with pytest.raises(BlueprintValidationError, match="maxRetries"):
        Flow("f").node("a", fetch, max_retries=0).to_blueprint()


async def test_built_flow_runs_with_its_own_registry() -> None:
    async def add_one(ctx: NodeContext) -> int:
        return ctx.input + 1

    flow = (
        Flow("run").node("start", lambda ctx: 1).node("next", add_one).node("last", Render)
        .edge("start", "next").edge("next", "last")
    )

    result = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint())

    assert result.status == "completed", result.errors
    assert result.context["_outputs.next"] == 2
    assert result.context["_outputs.last"] == "rendered"
