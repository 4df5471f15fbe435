"""Middleware around node execution: order, hooks, errors, in memory and on workers."""

from __future__ import annotations

from typing import Any

from distributed_helpers import Cluster
from flowcraft import Flow, FlowRuntime, Middleware, NodeResult


class Recorder(Middleware):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def before_node(self, ctx: Any, node_id: str) -> None:
        self.log.append(f"{self.name}.before {node_id}")

    async def around_node(self, ctx: Any, node_id: str, next: Any) -> Any:
        self.log.append(f"{self.name}.around> {node_id}")
        result = await next()
        self.log.append(f"{self.name}.around< {node_id}")
        return result

    async def after_node(self, ctx: Any, node_id: str, result: Any, error: Any) -> None:
        output = result.output if result is not None else None
        self.log.append(f"{self.name}.after {node_id} {output} {type(error).__name__}")


def chain() -> Flow:
    return (Flow("mw").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1)
            .edge("a", "b"))


async def test_first_middleware_is_outermost() -> None:
    log: list[str] = []
    flow = chain()
    runtime = FlowRuntime(registry=flow.registry(),
                          middleware=[Recorder("m1", log), Recorder("m2", log)])
    result = await runtime.run(flow.to_blueprint())
    assert result.status == "completed"
    assert log[:6] == ["m1.before a", "m2.before a", "m1.around> a", "m2.around> a",
                       "m2.around< a", "m1.around< a"]
    assert log[6:8] == ["m2.after a 1 NoneType", "m1.after a 1 NoneType"]
    assert len(log) == 16


async def test_objects_with_any_subset_of_hooks_and_sync_hooks() -> None:
    seen: list[str] = []

    class OnlyBefore:
        def before_node(self, ctx: Any, node_id: str) -> None:  # a plain function works too
            seen.append(node_id)

    flow = chain()
    result = await FlowRuntime(registry=flow.registry(), middleware=[OnlyBefore()]).run(
        flow.to_blueprint())
    assert result.status == "completed" and seen == ["a", "b"]


async def test_around_node_can_replace_the_result_and_write_the_context() -> None:
    class Double(Middleware):
        async def around_node(self, ctx: Any, node_id: str, next: Any) -> Any:
            result = await next()
            await ctx.set(f"seen.{node_id}", True)
            return NodeResult(output=result.output * 2)

    flow = chain()
    result = await FlowRuntime(registry=flow.registry(), middleware=[Double()]).run(
        flow.to_blueprint())
    assert result.context["_outputs.a"] == 2
    assert result.context["_outputs.b"] == 6  # (2 + 1) * 2
    assert result.context["seen.a"] is True


async def test_before_node_error_fails_the_node_without_running_it() -> None:
    ran: list[str] = []
    errors: list[Any] = []

    class Guard(Middleware):
        async def before_node(self, ctx: Any, node_id: str) -> None:
            if node_id == "b":
                raise PermissionError("b is not allowed")

        async def after_node(self, ctx: Any, node_id: str, result: Any, error: Any) -> None:
            errors.append((node_id, error))

    flow = (Flow("guard").node("a", lambda ctx: ran.append("a"))
            .node("b", lambda ctx: ran.append("b")).edge("a", "b"))
    result = await FlowRuntime(registry=flow.registry(), middleware=[Guard()]).run(
        flow.to_blueprint())
    assert result.status == "failed"
    assert ran == ["a"]
    (error,) = result.errors
    assert (error.node_id, error.error_type) == ("b", "PermissionError")
    assert "b is not allowed" in error.message
    assert errors[0] == ("a", None)
    assert errors[1][0] == "b" and isinstance(errors[1][1], PermissionError)


async def test_node_failure_reaches_around_and_after_and_can_be_rescued() -> None:
    seen: list[Any] = []

    class Rescue(Middleware):
        async def around_node(self, ctx: Any, node_id: str, next: Any) -> Any:
            try:
                return await next()
            except Exception as exc:
                seen.append(str(exc))
                return "rescued"

    def boom(ctx: Any) -> Any:
        raise ValueError("boom")

    flow = Flow("rescue").node("a", boom)
    result = await FlowRuntime(registry=flow.registry(), middleware=[Rescue()]).run(
        flow.to_blueprint())
    assert result.status == "completed"
    assert result.context["_outputs.a"] == "rescued"
    assert seen and "boom" in seen[0]


async def test_node_failure_passes_through_unchanged() -> None:
    after: list[Any] = []

    class Watch(Middleware):
        async def after_node(self, ctx: Any, node_id: str, result: Any, error: Any) -> None:
            after.append(error)

    def boom(ctx: Any) -> Any:
        raise ValueError("boom")

    flow = Flow("fail").node("a", boom, max_retries=2)
    result = await FlowRuntime(registry=flow.registry(), middleware=[Watch()]).run(
        flow.to_blueprint())
    (error,) = result.errors
    assert (error.error_type, error.attempt, error.message) == ("ValueError", 2,
                                                                "ValueError: boom")
    assert len(after) == 1 and "boom" in str(after[0])


async def test_after_node_errors_are_logged_and_ignored(caplog: Any) -> None:
    class Broken(Middleware):
        async def after_node(self, ctx: Any, node_id: str, result: Any, error: Any) -> None:
            raise RuntimeError("listener bug")

    flow = chain()
    result = await FlowRuntime(registry=flow.registry(), middleware=[Broken()]).run(
        flow.to_blueprint())
    assert result.status == "completed" and result.context["_outputs.b"] == 2
    assert "after_node of Broken failed" in caplog.text


async def test_a_parked_node_passes_through_around_node() -> None:
    log: list[str] = []
    flow = Flow("park").node("a", lambda ctx: 1).wait("w").edge("a", "w")
    runtime = FlowRuntime(registry=flow.registry(), middleware=[Recorder("m", log)])
    result = await runtime.run(flow.to_blueprint())
    assert result.status == "awaiting" and result.context["_awaitingNodeIds"] == ["w"]
    assert "m.around> w" in log and "m.around< w" not in log
    assert not any(line.startswith("m.after w") for line in log)


async def test_distributed_workers_apply_the_runtime_middleware() -> None:
    log: list[str] = []
    flow = chain()
    bp = flow.to_blueprint()

    class Tag(Middleware):
        async def before_node(self, ctx: Any, node_id: str) -> None:
            log.append(node_id)

        async def around_node(self, ctx: Any, node_id: str, next: Any) -> Any:
            result = await next()
            return NodeResult(output=result.output * 10)

    async with Cluster([bp], flow.registry(), workers=2) as cluster:
        cluster.runtime.options.middleware.append(Tag())
        result = await cluster.run(bp)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.a"] == 10
    assert result.context["_outputs.b"] == 110
    assert sorted(log) == ["a", "b"]
