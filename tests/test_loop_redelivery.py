"""A late duplicate of a job must not start a loop over again: the loop's head comes round
only through the loop itself (its back edge), never because the node before the loop is
announced a second time."""

from __future__ import annotations

import asyncio

from flowcraft import FlowRuntime, NodeContext, NodeResult, WorkflowBlueprint
from flowcraft.distributed import InProcessAdapter, InProcessQueue, JobPayload
from flowcraft.distributed.context import InMemoryRunStore

ITERATIONS = 3


def loop_blueprint() -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": "loop",
        "nodes": [
            {"id": "entry", "uses": "entry"},
            {"id": "head", "uses": "head"},
            {"id": "body", "uses": "body"},
            {"id": "ctl", "uses": "loop-controller",
             "params": {"condition": f"context.turns < {ITERATIONS}"}},
            {"id": "done", "uses": "done"},
        ],
        "edges": [
            {"source": "entry", "target": "head"},
            {"source": "head", "target": "body"},
            {"source": "body", "target": "ctl"},
            {"source": "ctl", "target": "head", "action": "continue"},
            {"source": "ctl", "target": "done", "action": "break"},
        ],
    })


async def test_a_duplicate_of_the_job_before_a_loop_does_not_run_the_loop_again() -> None:
    heads: list[int] = []
    in_body = asyncio.Event()
    go_on = asyncio.Event()

    async def entry(ctx: NodeContext) -> int:
        return 0

    async def head(ctx: NodeContext) -> int:
        heads.append(ctx.iteration)
        return ctx.iteration

    async def body(ctx: NodeContext) -> NodeResult:
        turns = (await ctx.context.get("turns") or 0) + 1
        await ctx.context.set("turns", turns)
        if turns == 1:
            in_body.set()
            await go_on.wait()  # the loop's first turn waits here
        return NodeResult(output=turns)

    async def done(ctx: NodeContext) -> str:
        return "done"

    bp = loop_blueprint()
    runtime = FlowRuntime(blueprints={bp.id: bp},
                          registry={"entry": entry, "head": head, "body": body, "done": done})
    queue, store, statuses = InProcessQueue(), InMemoryRunStore(), {}
    worker = InProcessAdapter(runtime.options, queue=queue, store=store, statuses=statuses,
                              poll_wait_seconds=0.05, lease_seconds=5)
    await worker.start()
    try:
        run_id = await worker.start_workflow(bp, {})
        await asyncio.wait_for(in_body.wait(), 10)
        # The entry node's job is delivered again (a redelivery after a lost delete).
        outcome = await worker.handle_job(JobPayload(run_id, bp.id, "entry", 0))
        assert outcome == "duplicate"
        await asyncio.sleep(0.3)  # give a wrongly sent job for the head time to run
        go_on.set()
        result = await worker.wait_for_result(run_id, timeout=20, poll_interval=0.05)
    finally:
        await worker.stop(timeout_seconds=5)
    assert result.status == "completed", result.errors
    assert heads == list(range(ITERATIONS))  # once per turn, in order
    assert result.context["turns"] == ITERATIONS
