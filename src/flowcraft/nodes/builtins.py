"""The built-in ``uses`` keys, available in every registry.

* ``subflow``      - run another blueprint as one node (``blueprintId``, ``inputs``, ``outputs``)
* ``sleep``        - pause (params ``duration``: ms or ``"5s"``, ``"10m"``, ``"2h"``, ``"1d"``)
* ``wait``         - park the run until ``resume`` / ``resume_with_action``
* ``webhook``      - park the run until a POST to its URL (see :mod:`flowcraft.webhook`)
* ``batch-scatter``/``batch-gather`` - fan out over a list, gather the results in order;
  ``chunkSize`` sends the workers out in waves (see below)
* ``loop-controller`` - ``continue`` / ``break`` on ``condition``, bounded by ``maxIterations``

Built-ins reach engine services (subflows, durable sleep) through ``ctx.engine``
(an :class:`~flowcraft.nodes.base.EngineServices`), so the same node works in memory
and on a distributed worker.

Batches in waves (``chunkSize``)
--------------------------------

What the TypeScript library means by it: a ``batch-scatter`` node's ``params`` may hold
``chunkSize`` (its builder's ``batch(id, worker, {inputKey, outputKey, chunkSize})``
writes it there and nowhere else; the gather's params are ``outputKey`` and
``gatherNodeId`` either way). Without it the whole list is one chunk. With it, the scatter
adds workers for items ``currentIndex`` to ``currentIndex + chunkSize`` only (each item
stored under a ``_batch.`` key of its own), and writes three context keys:
``<scatterId>_currentIndex`` (where the next chunk starts), ``<gatherNodeId>_hasMore``
(whether items are left) and ``<gatherNodeId>_allWorkerIds`` (the worker ids of every
chunk so far, extended in item order). The gather, finding ``hasMore``, adds another
``batch-scatter`` node for the next chunk instead of collecting; once nothing is left it
reads ``_outputs.<workerId>`` for every id in ``allWorkerIds``, in order, and writes that
list to ``outputKey``. So the intent is: at most ``chunkSize`` workers exist at a time, one
chunk after the other, and the gather's successors see all results in item order. (Its
released code does not get there: the gather completes after the first chunk with output
``[]`` and ``outputKey`` unwritten, so its successors run at once, and the scatter it adds
fails, given the gather's input value where a context key belongs and no worker key.
``chunkSize`` is not checked there: 0 adds no worker at all and fails the same way.)

Here the waves are chained by the scatter itself, with no engine support beyond
``follows`` in :func:`~flowcraft.core.graph.dynamic_addition`: a wave adds its workers
(ids ``<scatterId>_worker_<i>``, as without chunks) and, if items are left, a
``batch-scatter`` node ``<scatterId>_chunk_<k>`` that follows them. That node reads the
list from the first scatter's output (``inputs: "<scatterId>.items"``), carries the
first scatter's params plus ``scatterNodeId`` and ``startIndex``, and adds the next wave
the same way. Only the last wave leads to the gather, which therefore runs once, after
every worker, and outputs the results in item order as always. The three context keys
above are written as the TypeScript library writes them; each wave's output is
``{"gatherNodeId", "workerNodeIds", "hasMore"}`` (the first also holds ``items``). Without
``chunkSize`` nothing of this happens: one wave, no ``currentIndex`` or ``hasMore`` keys.
``chunkSize`` must be a positive whole number; anything else fails the scatter with an
error naming it.

Large maps on workers
---------------------

An engine whose ``ctx.engine`` offers ``start_map`` (a distributed worker does) may take
the map over instead: it runs the items as a *map ledger*
(:mod:`flowcraft.distributed.ledger`), whose workers are not nodes of the run, and the
scatter's output, once every item has run, is
``{"gatherNodeId", "ledger": true, "count", "results"}``
with the results in item order; the gather outputs those.
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
from .base import FOLLOWS, AwaitingSignal, NodeContext, NodeResult

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


LEDGER_RESULTS = "results"
"""Where the output of a scatter whose map ran as a map ledger holds the workers' results."""


def worker_node_id(scatter_id: str, index: int) -> str:
    return f"{scatter_id}_worker_{index}"


def chunk_size_of(value: Any, node_id: str) -> int | None:
    """A ``batch-scatter``'s ``chunkSize``: ``None`` when unset, else a positive integer."""
    if value is None:
        return None
    if (not isinstance(value, bool) and isinstance(value, int | float)
            and float(value).is_integer() and value >= 1):
        return int(value)
    raise FlowcraftError(
        f"batch-scatter node '{node_id}': 'chunkSize' must be a positive whole number, got "
        f"{value!r}",
        node_id=node_id,
    )


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
    chunk_size = chunk_size_of(ctx.params.get("chunkSize"), ctx.node_id)
    start_map = getattr(ctx.engine, "start_map", None)
    if start_map is not None and not ctx.params.get("scatterNodeId"):
        # A worker that keeps large maps out of the run's item (a map ledger) takes it here.
        ledger = await start_map(ctx, list(items), worker_uses, gather_id, chunk_size)
        if ledger is not None:
            return ledger  # type: ignore[no-any-return]
    if chunk_size is None:
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
    return await _scatter_wave(ctx, items, worker_uses, gather_id, chunk_size)


async def _scatter_wave(ctx: NodeContext, items: list[Any] | tuple[Any, ...], worker_uses: str,
                        gather_id: str, chunk_size: int) -> NodeResult:
    """One wave of a chunked batch (the module docstring): its workers, and the scatter
    node of the next wave after them while items are left."""
    scatter_id = ctx.params.get("scatterNodeId") or ctx.node_id
    start = int(ctx.params.get("startIndex") or 0)
    end = min(start + chunk_size, len(items))
    worker_ids = [worker_node_id(scatter_id, i) for i in range(start, end)]
    nodes: list[NodeDefinition] = [
        NodeDefinition(id=worker_id, uses=worker_uses, inputs=f"{scatter_id}.items.{i}")
        for i, worker_id in zip(range(start, end), worker_ids, strict=True)
    ]
    has_more = end < len(items)
    if has_more:
        nodes.append(NodeDefinition.model_validate({
            "id": f"{scatter_id}_chunk_{end // chunk_size}",
            "uses": "batch-scatter",
            "inputs": f"{scatter_id}.items",
            "params": {**ctx.params, "scatterNodeId": scatter_id, "startIndex": end},
            FOLLOWS: worker_ids,
        }))
    earlier = await ctx.context.get(f"{gather_id}_allWorkerIds") if start else None
    await ctx.context.set(f"{gather_id}_allWorkerIds", [*(earlier or []), *worker_ids])
    await ctx.context.set(f"{scatter_id}_currentIndex", end)
    await ctx.context.set(f"{gather_id}_hasMore", has_more)
    output: dict[str, Any] = {"gatherNodeId": gather_id, "workerNodeIds": worker_ids,
                              "hasMore": has_more}
    if scatter_id == ctx.node_id:
        output["items"] = list(items)
    return NodeResult(output=output, dynamic_nodes=nodes)


async def batch_gather_node(ctx: NodeContext) -> list[Any]:
    gather_id = ctx.params.get("gatherNodeId") or ctx.node_id
    if (isinstance(ctx.input, dict) and ctx.input.get("ledger") is True
            and isinstance(ctx.input.get(LEDGER_RESULTS), list)):
        # A map ledger's scatter delivers the results, in item order.
        results = list(ctx.input[LEDGER_RESULTS])
    else:
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
