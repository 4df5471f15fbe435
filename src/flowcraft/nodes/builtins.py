"""The built-in ``uses`` keys, available in every registry.

* ``subflow``      - run another blueprint as one node (``blueprintId``, ``inputs``, ``outputs``)
* ``sleep``        - pause (params ``duration``: ms or ``"5s"``, ``"10m"``, ``"2h"``, ``"1d"``)
* ``wait``         - park the run until ``resume`` / ``resume_with_action``
* ``webhook``      - park the run until a POST to its URL (see :mod:`flowcraft.webhook`)
* ``batch-scatter``/``batch-gather`` - fan out over a list, gather the results in order
* ``loop-controller`` - ``continue`` / ``break`` on ``condition``, bounded by ``maxIterations``

Built-ins reach engine services (subflows, durable sleep) through ``ctx.engine``
(an :class:`~flowcraft.nodes.base.EngineServices`), so the same node works in memory
and on a distributed worker.
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any
from urllib.parse import quote

from ..blueprint import NodeDefinition
from ..errors import FlowcraftError
from ..expressions import evaluate
from .base import AwaitingSignal, NodeContext, NodeResult

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(value: Any, node_id: str = "") -> float:
    """``1500`` → 1500 ms; ``"5s"`` → 5000 ms; ``"10m"``, ``"2h"``, ``"1d"`` likewise."""
    if isinstance(value, bool) or value is None:
        raise FlowcraftError(f"sleep node '{node_id}': 'duration' is missing", node_id=node_id)
    if isinstance(value, int | float):
        duration = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        duration = float(match.group(1)) * _UNIT_MS[match.group(2)]
    else:
        raise FlowcraftError(
            f"sleep node '{node_id}': invalid duration {value!r}; use milliseconds or "
            "a string like '5s', '10m', '2h', '1d'",
            node_id=node_id,
        )
    if duration < 0:
        raise FlowcraftError(f"sleep node '{node_id}': negative duration", node_id=node_id)
    return duration


async def sleep_node(ctx: NodeContext) -> Any:
    duration_ms = parse_duration_ms(ctx.params.get("duration"), ctx.node_id)
    await ctx.engine.sleep(ctx, duration_ms / 1000.0)
    return ctx.input


async def wait_node(ctx: NodeContext) -> Any:
    details = {"reason": "external_event"}
    details.update({k: v for k, v in ctx.params.items() if isinstance(k, str)})
    raise AwaitingSignal(details)


WEBHOOK_BASE_URL_ENV = "FLOWCRAFT_WEBHOOK_BASE_URL"


def webhook_path(run_id: str, node_id: str, token: str) -> str:
    """``/<run id>/<node id>/<token>``, each part percent-encoded, relative to the app."""
    return "/" + "/".join(quote(part, safe="") for part in (run_id, node_id, token))


async def webhook_node(ctx: NodeContext) -> Any:
    # A fresh unguessable token per parking: only the holder of the URL can resume it.
    token = secrets.token_urlsafe(32)
    base = ctx.params.get("baseUrl") or os.environ.get(WEBHOOK_BASE_URL_ENV, "")
    path = webhook_path(ctx.run_id, ctx.node_id, token)
    details = {k: v for k, v in ctx.params.items() if isinstance(k, str) and k != "baseUrl"}
    details.update({"reason": "webhook", "token": token, "method": "POST",
                    "url": str(base).rstrip("/") + path})
    raise AwaitingSignal(details)


async def subflow_node(ctx: NodeContext) -> Any:
    blueprint_id = ctx.params.get("blueprintId")
    if not blueprint_id:
        raise FlowcraftError(
            f"subflow node '{ctx.node_id}' needs a 'blueprintId' parameter", node_id=ctx.node_id
        )
    return await ctx.engine.run_subflow(ctx, blueprint_id)


def worker_node_id(scatter_id: str, index: int) -> str:
    return f"{scatter_id}_worker_{index}"


async def batch_scatter_node(ctx: NodeContext) -> NodeResult:
    items = ctx.input if ctx.input is not None else []
    if not isinstance(items, list | tuple):
        raise FlowcraftError(
            f"batch-scatter node '{ctx.node_id}' needs a list as input, got "
            f"{type(items).__name__}",
            node_id=ctx.node_id,
        )
    worker_uses = ctx.params.get("workerUsesKey")
    gather_id = ctx.params.get("gatherNodeId")
    if not worker_uses or not gather_id:
        raise FlowcraftError(
            f"batch-scatter node '{ctx.node_id}' needs 'workerUsesKey' and 'gatherNodeId'",
            node_id=ctx.node_id,
        )
    worker_ids = [worker_node_id(ctx.node_id, i) for i in range(len(items))]
    workers = [
        NodeDefinition(id=worker_id, uses=worker_uses, inputs=f"{ctx.node_id}.items.{i}")
        for i, worker_id in enumerate(worker_ids)
    ]
    await ctx.context.set(f"{gather_id}_allWorkerIds", worker_ids)
    return NodeResult(
        output={"gatherNodeId": gather_id, "items": list(items), "workerNodeIds": worker_ids},
        dynamic_nodes=workers,
    )


async def batch_gather_node(ctx: NodeContext) -> list[Any]:
    gather_id = ctx.params.get("gatherNodeId") or ctx.node_id
    worker_ids = await ctx.context.get(f"{gather_id}_allWorkerIds") or []
    results = [await ctx.context.get(f"_outputs.{worker_id}") for worker_id in worker_ids]
    output_key = ctx.params.get("outputKey")
    if output_key:
        await ctx.context.set(output_key, results)
    return results


async def loop_controller_node(ctx: NodeContext) -> NodeResult:
    condition = ctx.params.get("condition")
    if not condition:
        raise FlowcraftError(
            f"loop-controller node '{ctx.node_id}' needs a 'condition' parameter",
            node_id=ctx.node_id,
        )
    max_iterations = ctx.params.get("maxIterations")
    if max_iterations is not None and ctx.iteration + 1 >= int(max_iterations):
        return NodeResult(output=ctx.input, action="break")
    from ..context import ConditionNames

    names = ConditionNames(ctx.context.data, {"output": ctx.input, "iteration": ctx.iteration})
    verdict = evaluate(condition, names)
    return NodeResult(output=ctx.input, action="continue" if verdict else "break")


BUILTIN_NODES: dict[str, Any] = {
    "subflow": subflow_node,
    "sleep": sleep_node,
    "wait": wait_node,
    "webhook": webhook_node,
    "batch-scatter": batch_scatter_node,
    "batch-gather": batch_gather_node,
    "loop-controller": loop_controller_node,
}
