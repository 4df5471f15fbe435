"""A run gives at most ``MAX_TASKS_PER_RUN`` node executions a task at once; the rest of a
very wide fan-out waits in order and every node still runs once."""

from __future__ import annotations

import asyncio

import pytest

from flowcraft import FlowRuntime, NodeContext, WorkflowBlueprint
from flowcraft.runtime import runtime as runtime_module


@pytest.mark.parametrize("limit", [1, 7, 50])
async def test_a_fan_wider_than_the_task_limit_runs_every_node_once(
        monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    monkeypatch.setattr(runtime_module, "MAX_TASKS_PER_RUN", limit)
    width = 120
    running = 0
    most = 0
    ran: list[str] = []

    async def work(ctx: NodeContext) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        ran.append(ctx.node_id)
        running -= 1
        return 1

    async def total(ctx: NodeContext) -> int:
        return sum(ctx.input.values())

    nodes = [{"id": "start", "uses": "work"}, {"id": "sink", "uses": "total"}]
    nodes += [{"id": f"b{i}", "uses": "work"} for i in range(width)]
    edges = [{"source": "start", "target": f"b{i}"} for i in range(width)]
    edges += [{"source": f"b{i}", "target": "sink"} for i in range(width)]
    blueprint = WorkflowBlueprint.model_validate({"id": "wide", "nodes": nodes, "edges": edges})
    result = await FlowRuntime(registry={"work": work, "total": total}).run(blueprint)
    assert result.status == "completed"
    assert result.context["_outputs.sink"] == width
    assert sorted(ran) == sorted(["start", *(f"b{i}" for i in range(width))])
    assert most <= limit  # never more node executions at once than tasks
