"""The same blueprint behaves as in the TypeScript library: one test per behaviour, each run
in memory and, where routing or inputs are involved, on in-process distributed workers too
(the namespace of expressions and the input rules live in the routing module both share)."""

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
    NodeResult,
    WorkflowBlueprint,
    WorkflowResult,
)
from flowcraft.distributed import InProcessAdapter
from flowcraft.errors import InvalidOptionError


def blueprint(raw: dict[str, Any]) -> WorkflowBlueprint:
    raw.setdefault("id", "fidelity")
    return WorkflowBlueprint.model_validate(raw)


async def run_in_memory(bp: WorkflowBlueprint, registry: dict[str, Any],
                        context: dict[str, Any] | None = None) -> WorkflowResult:
    return await FlowRuntime(registry=registry).run(bp, context or {})


async def run_distributed(bp: WorkflowBlueprint, registry: dict[str, Any],
                          context: dict[str, Any] | None = None) -> WorkflowResult:
    runtime = FlowRuntime(blueprints={bp.id: bp}, registry=registry)
    worker = InProcessAdapter(runtime.options)
    await worker.start()
    try:
        run_id = await worker.start_workflow(bp, context or {})
        return await worker.wait_for_result(run_id, timeout=20)
    finally:
        await worker.stop()


BOTH = pytest.mark.parametrize("run", [run_in_memory, run_distributed],
                               ids=["memory", "distributed"])


def outputs(result: WorkflowResult) -> dict[str, Any]:
    prefix = "_outputs."
    return {k[len(prefix):]: v for k, v in result.context.items() if k.startswith(prefix)}


def constant(value: Any) -> Any:
    async def node(ctx: NodeContext) -> Any:
        return value

    return node


async def echo(ctx: NodeContext) -> Any:
    return ctx.input


# -- expressions that name a node ---------------------------------------------------------------


@BOTH
async def test_a_condition_reads_a_node_output_by_the_bare_node_id(run: Any) -> None:
    bp = blueprint({
        "nodes": [{"id": "route", "uses": "total"}, {"id": "big", "uses": "tag"},
                  {"id": "small", "uses": "tag"}],
        "edges": [{"source": "route", "target": "big", "condition": "route.total > 100"},
                  {"source": "route", "target": "small", "condition": "route.total <= 100"}],
    })

    result = await run(bp, {"total": constant({"total": 150}), "tag": constant("ran")})

    assert result.status == "completed"
    assert outputs(result) == {"route": {"total": 150}, "big": "ran"}
    assert "route" not in result.context  # outputs are stored once, under _outputs.<id>


@BOTH
async def test_transforms_and_context_lookups_read_node_outputs_by_id(run: Any) -> None:
    bp = blueprint({
        "nodes": [{"id": "price", "uses": "price"}, {"id": "qty", "uses": "qty"},
                  {"id": "total", "uses": "echo"}],
        "edges": [{"source": "price", "target": "qty"},
                  {"source": "qty", "target": "total",
                   "condition": "context['price'].amount > 0 and 'price' in context",
                   "transform": "input * context.price.amount + price.fee"}],
    })

    result = await run(bp, {"price": constant({"amount": 4, "fee": 1}), "qty": constant(3),
                             "echo": echo})

    assert result.status == "completed"
    assert outputs(result)["total"] == 13
    assert result.context["_inputs.total"] == 13


@BOTH
async def test_a_context_key_wins_over_a_node_of_the_same_name(run: Any) -> None:
    bp = blueprint({
        "nodes": [{"id": "limit", "uses": "limit"}, {"id": "over", "uses": "tag"}],
        "edges": [{"source": "limit", "target": "over", "condition": "limit == 'from context'"}],
    })

    result = await run(bp, {"limit": constant("from node"), "tag": constant("ran")},
                       {"limit": "from context"})

    assert outputs(result) == {"limit": "from node", "over": "ran"}


async def test_a_loop_condition_reads_a_node_output_by_id() -> None:
    count = {"n": 0}

    async def body(ctx: NodeContext) -> Any:
        count["n"] += 1
        return {"n": count["n"]}

    flow = (
        Flow("loop-by-id")
        .node("body", body)
        .loop("again", start_node_id="body", end_node_id="body", condition="body.n < 3",
              max_iterations=10)
        .node("done", echo)
        .edge("again", "done")
    )

    result = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint())

    assert result.status == "completed"
    assert count["n"] == 3


# -- loop exits ---------------------------------------------------------------------------------


def counting_loop() -> tuple[WorkflowBlueprint, dict[str, Any]]:
    """The TypeScript library's own example: a conditional exit leaves at counter 5."""

    async def start(ctx: NodeContext) -> Any:
        await ctx.context.set("counter", 0)
        return 0

    async def body(ctx: NodeContext) -> Any:
        counter = await ctx.context.get("counter") + 1
        await ctx.context.set("counter", counter)
        return counter

    flow = (
        Flow("loop-exit")
        .node("start", start)
        .node("body", body)
        .node("special_exit", constant("special exit!"))
        .node("end", constant("finished"))
        .loop("my_loop", start_node_id="body", end_node_id="body", condition="counter < 10")
        .edge("start", "my_loop")
        .edge("my_loop", "special_exit", condition="counter === 5")
        .edge("my_loop", "end")
    )
    return flow.to_blueprint(), flow.registry()


@BOTH
async def test_conditional_loop_exits_are_checked_on_every_iteration(run: Any) -> None:
    bp, registry = counting_loop()

    result = await run(bp, registry)

    assert result.status == "completed"
    assert result.context["counter"] == 5
    assert outputs(result)["special_exit"] == "special exit!"
    assert "end" not in outputs(result)  # the exit that held is the only one taken


@BOTH
async def test_a_conditional_exit_leaves_a_body_first_loop_too(run: Any) -> None:
    async def body(ctx: NodeContext) -> Any:
        counter = (await ctx.context.get("counter") or 0) + 1
        await ctx.context.set("counter", counter)
        return counter

    flow = (
        Flow("body-first")
        .node("body", body)
        .loop("check", start_node_id="body", end_node_id="body", condition="true",
              max_iterations=50)
        .node("early", echo)
        .node("late", echo)
        .edge("check", "early", condition="counter >= 3")
        .edge("check", "late")
    )

    result = await run(flow.to_blueprint(), flow.registry())

    assert result.status == "completed"
    assert result.context["counter"] == 3
    assert outputs(result)["early"] == 3 and "late" not in outputs(result)


TYPESCRIPT_LOOP = {  # written by the TypeScript library's builder (its function keys renamed)
    "id": "conditional-loop-exit",
    "nodes": [{"id": "start", "uses": "start"}, {"id": "body", "uses": "body"},
              {"id": "specialExit", "uses": "special"}, {"id": "end", "uses": "end"},
              {"id": "myLoop", "uses": "loop-controller", "params": {"condition": "counter < 10"},
               "config": {"joinStrategy": "any"}}],
    "edges": [{"source": "myLoop", "target": "specialExit", "condition": "counter === 5",
               "action": "break", "transform": "context[\"body\"]"},
              {"source": "myLoop", "target": "end", "action": "break",
               "transform": "context[\"body\"]"},
              {"source": "body", "target": "myLoop"},
              {"source": "myLoop", "target": "body", "action": "continue",
               "transform": "context[\"body\"]"},
              {"source": "start", "target": "myLoop"}],
}


@BOTH
async def test_a_loop_blueprint_written_by_the_typescript_builder_ends_the_same(run: Any) -> None:
    _, registry = counting_loop()
    registry = {"start": registry["loop-exit.start"], "body": registry["loop-exit.body"],
                "special": constant("special exit!"), "end": constant("finished")}

    result = await run(WorkflowBlueprint.model_validate(TYPESCRIPT_LOOP), registry)

    # What the TypeScript library's run of it ends with, besides its bare-id copies.
    assert result.status == "completed"
    assert result.context["counter"] == 5
    assert outputs(result) == {"start": 0, "body": 5, "myLoop": 5, "specialExit": "special exit!"}
    assert result.context["_inputs.specialExit"] == 5
    assert result.context["_inputs.body"] == 4


@BOTH
async def test_a_loop_without_a_conditional_exit_still_runs_to_its_break(run: Any) -> None:
    bp, registry = counting_loop()
    raw = bp.to_dict()
    raw["edges"] = [e for e in raw["edges"] if e["target"] != "special_exit"]
    raw["nodes"] = [n for n in raw["nodes"] if n["id"] != "special_exit"]

    result = await run(WorkflowBlueprint.model_validate(raw), registry)

    assert result.status == "completed"
    assert result.context["counter"] == 10
    assert outputs(result)["end"] == "finished"


def test_a_loop_controller_without_a_continue_edge_is_a_validation_error() -> None:
    bp = blueprint({
        "nodes": [{"id": "body", "uses": "tag"},
                  {"id": "check", "uses": "loop-controller", "params": {"condition": "true"}},
                  {"id": "end", "uses": "tag"}],
        "edges": [{"source": "body", "target": "check"},
                  {"source": "check", "target": "end", "action": "break"}],
    })

    with pytest.raises(BlueprintValidationError) as caught:
        import asyncio

        asyncio.run(FlowRuntime(registry={"tag": constant(1)}).run(bp))

    assert caught.value.problems == [
        "node 'check': loop-controller has no edge with action 'continue' back into its loop "
        "body; add one (Flow.loop(...) wires it), or use another node type"
    ]


# -- edge transforms and explicit inputs ---------------------------------------------------------


@BOTH
@pytest.mark.parametrize(("inputs", "expected"), [
    ("price", 10),           # a plain context key: the transform sees the edge's delivery
    ("a", 10),               # the edge's own source
    ("base", 40),            # another node's output: the transform sees that output
    ("_seed", 6),            # an engine-style key
    ({"p": "price"}, 10),    # a mapping: the transform sees the edge's delivery
])
async def test_an_edge_transform_applies_to_a_node_with_explicit_inputs(
    run: Any, inputs: Any, expected: Any
) -> None:
    bp = blueprint({
        "nodes": [{"id": "base", "uses": "twenty"}, {"id": "a", "uses": "five"},
                  {"id": "b", "uses": "echo", "inputs": inputs}],
        "edges": [{"source": "base", "target": "a"},
                  {"source": "a", "target": "b", "transform": "input * 2"}],
    })

    result = await run(bp, {"twenty": constant(20), "five": constant(5), "echo": echo},
                       {"price": 7, "_seed": 3})

    assert result.status == "completed"
    assert outputs(result)["b"] == expected
    assert result.context["_inputs.b"] == expected


@BOTH
async def test_explicit_inputs_without_a_transform_are_unchanged(run: Any) -> None:
    bp = blueprint({
        "nodes": [{"id": "a", "uses": "five"}, {"id": "b", "uses": "echo", "inputs": "price"}],
        "edges": [{"source": "a", "target": "b"}],
    })

    result = await run(bp, {"five": constant(5), "echo": echo}, {"price": 7})

    assert outputs(result)["b"] == 7
    assert "_inputs.b" not in result.context


# -- a parked sleep -----------------------------------------------------------------------------


async def test_resuming_a_parked_sleep_passes_its_input_on() -> None:
    flow = (
        Flow("nap")
        .node("make", constant({"order": 17}))
        .sleep("nap", "1h")
        .node("after", echo)
        .edge("make", "nap")
        .edge("nap", "after")
    )
    runtime = FlowRuntime(registry=flow.registry(), max_inline_sleep_seconds=1)
    bp = flow.to_blueprint()
    parked = await runtime.run(bp)
    assert parked.status == "awaiting"

    resumed = await runtime.resume(bp, parked.serialized_context, {})

    assert resumed.status == "completed", resumed.errors
    assert outputs(resumed)["nap"] == {"order": 17}
    assert outputs(resumed)["after"] == {"order": 17}

    given = await runtime.resume(bp, parked.serialized_context, {"output": "given"})
    assert outputs(given)["after"] == "given"  # an explicit output still wins


# -- post() after a fallback --------------------------------------------------------------------


async def test_post_runs_on_the_result_of_fallback() -> None:
    class Rescued(BaseNode):
        async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
            raise ConnectionError("down")

        async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
            return "rescued"

        async def post(self, exec_result: Any, ctx: NodeContext) -> Any:
            return NodeResult(output=f"{exec_result}+post", action="late")

    bp = blueprint({
        "nodes": [{"id": "a", "uses": "rescued"}, {"id": "b", "uses": "echo"}],
        "edges": [{"source": "a", "target": "b", "action": "late"}],
    })

    result = await run_in_memory(bp, {"rescued": Rescued, "echo": echo})

    assert result.status == "completed"
    assert outputs(result) == {"a": "rescued+post", "b": "rescued+post"}


async def test_a_failing_post_does_not_run_exec_again() -> None:
    """Only exec() is retried: a post() that fails must not repeat exec()'s side effects,
    and the class's fallback() (which rescues exec failures) does not run for it."""
    calls: list[str] = []

    class Charge(BaseNode):
        async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
            calls.append("exec")
            return "charged"

        async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
            calls.append("fallback")
            return "rescued"

        async def post(self, exec_result: Any, ctx: NodeContext) -> Any:
            calls.append("post")
            raise ValueError("cannot shape the result")

    bp = blueprint({"nodes": [{"id": "a", "uses": "charge", "config": {"maxRetries": 3}}]})

    result = await run_in_memory(bp, {"charge": Charge})

    assert result.status == "failed"
    assert calls == ["exec", "post"]
    assert "cannot shape the result" in result.errors[0].message


# -- deliberately stricter ----------------------------------------------------------------------


async def test_a_negative_concurrency_is_refused_with_a_flowcraft_error() -> None:
    runtime = FlowRuntime(registry={"one": constant(1)})
    bp = blueprint({"nodes": [{"id": "a", "uses": "one"}]})

    for bad in (-1, 1.5, True):
        with pytest.raises(InvalidOptionError, match="concurrency must be a whole number"):
            await runtime.run(bp, concurrency=bad)
    assert issubclass(InvalidOptionError, FlowcraftError)
    assert (await runtime.run(bp, concurrency=0)).status == "completed"  # 0: no limit


def test_an_empty_node_id_is_refused_with_a_flowcraft_error() -> None:
    with pytest.raises(FlowcraftError) as caught:
        blueprint({"nodes": [{"id": "", "uses": "one"}]})

    assert isinstance(caught.value, BlueprintValidationError)
    assert caught.value.problems == ["node #0: id is empty"]
