"""Bad input never loses a run's result: values the store cannot hold, expressions that fail
after a node ran, and initial contexts that claim engine-owned keys."""

from __future__ import annotations

import datetime
import json
import math
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from flowcraft import Flow, FlowRuntime, NodeContext, WorkflowResult
from flowcraft.cli import main
from flowcraft.errors import InvalidContextError, UnstorableValueError


class Calls:
    """Counts how often each node (and fallback) ran."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def returning(self, name: str, value: Any) -> Any:
        async def node(ctx: NodeContext) -> Any:
            self.counts[name] = self.counts.get(name, 0) + 1
            return value

        return node


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


async def run(flow: Flow, context: dict[str, Any] | None = None) -> WorkflowResult:
    return await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint(), context)


class Opaque:
    pass


UNSTORABLE = {
    "nan": math.nan,
    "infinity": math.inf,
    "decimal": Decimal("1.10"),
    "bytes": b"\x00",
    "datetime": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    "set": {1, 2},
    "object": Opaque(),
    "nested": {"items": [1, {"price": math.nan}]},
}


@pytest.mark.parametrize("value", UNSTORABLE.values(), ids=UNSTORABLE.keys())
async def test_unstorable_output_fails_the_node_once_without_retry_or_fallback(value: Any) -> None:
    calls = Calls()
    flow = (
        Flow("unstorable")
        .node("a", calls.returning("a", value), max_retries=3,
              fallback=calls.returning("fallback", "saved"))
        .node("b", calls.returning("b", 1))
        .edge("a", "b")
    )
    result = await run(flow)
    assert result.status == "failed"
    assert calls.counts == {"a": 1}
    [error] = result.errors
    assert error.node_id == "a"
    assert error.error_type == "UnstorableValueError"
    assert "output of node 'a' cannot be stored" in error.message
    assert "_outputs.a" not in result.context
    strict_json(result.serialized_context)
    strict_json(json.dumps(result.to_dict(), allow_nan=False))


async def test_circular_output_fails_the_node() -> None:
    loop: list[Any] = []
    loop.append(loop)
    result = await run(Flow("circular").node("a", Calls().returning("a", loop)))
    assert result.status == "failed"
    assert "circular" in result.errors[0].message
    strict_json(result.serialized_context)


async def test_unstorable_context_write_fails_the_node_and_is_undone() -> None:
    async def writer(ctx: NodeContext) -> str:
        await ctx.context.set("kept", "fine")
        await ctx.context.set("price", Decimal("9.99"))
        return "done"

    def sync_writer(ctx: NodeContext) -> str:
        ctx.context.sync.set("when", datetime.datetime.now(datetime.UTC))
        return "done"

    for implementation, key in ((writer, "price"), (sync_writer, "when")):
        flow = Flow("writes").node("a", implementation, max_retries=2)
        result = await run(flow, {key: "before", "other": 1})
        assert result.status == "failed", result
        [error] = result.errors
        assert error.error_type == "UnstorableValueError"
        assert f"context key '{key}' written by node 'a'" in error.message
        assert error.attempt == 1
        assert result.context[key] == "before"  # the refused write is undone
        strict_json(result.serialized_context)
    assert result.context.get("kept") is None  # the sync node never wrote it


async def test_context_keys_must_be_strings() -> None:
    async def writer(ctx: NodeContext) -> str:
        await ctx.context.set(7, "seven")  # type: ignore[arg-type]
        return "done"

    result = await run(Flow("int-key").node("a", writer))
    assert result.status == "failed"
    assert "context key 7 of type int" in result.errors[0].message
    assert 7 not in result.context
    strict_json(result.serialized_context)


async def test_value_changed_in_place_fails_the_run_instead_of_raising() -> None:
    async def mutate(ctx: NodeContext) -> str:
        items = await ctx.context.get("items")
        items.append(Opaque())  # no set(): the engine never sees this write
        return "done"

    result = await run(Flow("in-place").node("a", mutate), {"items": [1]})
    assert result.status == "failed"
    [error] = result.errors
    assert "context key 'items'" in error.message
    assert "items" not in result.context
    strict_json(result.serialized_context)


async def test_failing_condition_fails_the_node_once_without_retry_or_fallback() -> None:
    calls = Calls()
    flow = (
        Flow("bad-condition")
        .node("a", calls.returning("a", 3), max_retries=3,
              fallback=calls.returning("fallback", "saved"))
        .node("b", calls.returning("b", 1))
        .edge("a", "b", condition="len(result.output) > 1")
    )
    result = await run(flow)
    assert result.status == "failed"
    assert calls.counts == {"a": 1}
    [error] = result.errors
    assert error.node_id == "a"
    assert error.attempt == 1
    assert error.error_type == "ExpressionError"
    assert "condition of edge a -> b" in error.message
    assert "len() needs a list" in error.message
    assert "_outputs.a" not in result.context


async def test_failing_condition_in_a_loop_keeps_the_previous_iteration_output() -> None:
    async def count(ctx: NodeContext) -> Any:
        previous = await ctx.context.get("_outputs.count") or 0
        return previous + 1 if previous < 2 else "three"

    flow = Flow("loop-bad-condition").node("count", count)
    flow.edge("count", "count", condition="result.output - 10 < 0")
    result = await run(flow)
    assert result.status == "failed"
    [error] = result.errors
    assert error.node_id == "count"
    assert "condition of edge count -> count" in error.message
    assert result.context["_outputs.count"] == 2


async def test_transform_that_fails_or_builds_an_unstorable_value_fails_the_target() -> None:
    calls = Calls()
    for transform, expected in (("input.total / 0", "division by zero"),
                                ("float('nan')", "its result cannot be stored")):
        flow = (
            Flow("bad-transform")
            .node("a", calls.returning("a", {"total": 1}))
            .node("b", calls.returning("b", 1))
            .edge("a", "b", transform=transform)
        )
        result = await run(flow)
        assert result.status == "failed"
        [error] = result.errors
        assert error.node_id == "b"
        assert "transform of edge a -> b failed" in error.message
        assert expected in error.message
        assert "b" not in calls.counts
        strict_json(result.serialized_context)


@pytest.mark.parametrize("key", ["_outputs.a", "_inputs.a", "_flowcraft.node.a",
                                 "_awaitingNodeIds", "_awaitingDetails"])
async def test_engine_keys_in_the_initial_context_are_refused(key: str) -> None:
    calls = Calls()
    flow = Flow("planted").node("a", calls.returning("a", 1))
    with pytest.raises(InvalidContextError, match=f"'{key}' belongs to the engine"):
        await run(flow, {key: {"n": 1, "taken": []}})
    assert calls.counts == {}


async def test_unstorable_initial_context_is_refused() -> None:
    flow = Flow("nan-start").node("a", Calls().returning("a", 1))
    with pytest.raises(InvalidContextError, match="not a JSON number"):
        await run(flow, {"x": math.nan})
    with pytest.raises(InvalidContextError, match="not a JSON number"):
        await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint(), '{"x": NaN}')


async def test_subflow_child_runs_still_receive_engine_inputs() -> None:
    child = Flow("child").node("start", lambda ctx: ctx.input * 2)
    parent = Flow("parent").node("a", Calls().returning("a", 21)).subflow("sub", "child")
    parent.edge("a", "sub")
    runtime = FlowRuntime(blueprints={"child": child.to_blueprint()},
                          registry={**child.registry(), **parent.registry()})
    result = await runtime.run(parent.to_blueprint())
    assert result.status == "completed", result.errors
    assert result.context["_outputs.sub"] == 42


async def test_unstorable_resume_output_is_refused_before_anything_changes() -> None:
    flow = Flow("resume-nan").wait("w")
    runtime = FlowRuntime(registry=flow.registry())
    parked = await runtime.run(flow.to_blueprint())
    with pytest.raises(UnstorableValueError, match="resume data"):
        await runtime.resume(flow.to_blueprint(), parked.serialized_context,
                             {"output": math.inf})


# -- the command line --------------------------------------------------------------------------


@pytest.fixture
def nan_blueprint(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "nan_nodes.py").write_text(textwrap.dedent("""
        registry = {"nan": lambda ctx: float("nan"), "one": lambda ctx: 1}
    """))
    blueprint = tmp_path / "nan.json"
    blueprint.write_text(json.dumps({
        "id": "nan", "nodes": [{"id": "a", "uses": "nan"}, {"id": "b", "uses": "one"}],
        "edges": [{"source": "a", "target": "b"}],
    }))
    return blueprint, f"{tmp_path / 'nan_nodes.py'}:registry"


def test_cli_run_json_is_strict_json(nan_blueprint: tuple[Path, str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    blueprint, registry = nan_blueprint
    assert main(["run", str(blueprint), "--registry", registry, "--json"]) == 1
    printed = strict_json(capsys.readouterr().out)
    assert printed["status"] == "failed"
    assert printed["errors"][0]["errorType"] == "UnstorableValueError"


def test_cli_run_refuses_engine_keys_in_context(nan_blueprint: tuple[Path, str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    blueprint, registry = nan_blueprint
    status = main(["run", str(blueprint), "--registry", registry,
                   "--context", '{"_outputs.a": 5}'])
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert "'_outputs.a' belongs to the engine" in line
