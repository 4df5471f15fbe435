"""``flowcraft demo``: the example order pipeline, run end to end.

``--backend memory`` runs every order in this process. The distributed
backends start local services, provision them, start worker processes and
drive the same workflow through a real queue and database.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from .blueprint import load_blueprint
from .events import FlowcraftEvent, InMemoryEventBus
from .examples import EXAMPLES_DIR
from .examples.orders import registry, sample_orders

DEMO_BLUEPRINT = EXAMPLES_DIR / "order_pipeline.json"


def run_demo(backend: str = "memory", orders: int = 6, workers: int = 3) -> int:
    if backend == "memory":
        return asyncio.run(_memory_demo(orders))
    raise ValueError(f"unknown demo backend {backend!r}")


async def _memory_demo(order_count: int) -> int:
    from .runtime import FlowRuntime

    blueprint = load_blueprint(DEMO_BLUEPRINT)
    bus = InMemoryEventBus(keep_history=False)
    finished: dict[str, int] = {}

    def progress(event: FlowcraftEvent) -> None:
        run_id = event.payload["runId"]
        finished[run_id] = finished.get(run_id, 0) + 1

    bus.subscribe(progress, "node:finish")
    runtime = FlowRuntime(registry=registry, event_bus=bus)
    print(f"flowcraft demo: {order_count} orders through '{blueprint.id}' in memory")
    started = time.perf_counter()
    results = await asyncio.gather(*(
        runtime.run(blueprint, {"order": order}, run_id=order["id"])
        for order in sample_orders(order_count)
    ))
    elapsed = time.perf_counter() - started
    return report(results, elapsed, finished)


def report(results: list[Any], elapsed: float, node_counts: dict[str, int]) -> int:
    failures = 0
    for result in results:
        notify = result.context.get("_outputs.notify")
        line = f"  {result.run_id}: {result.status:<9} {node_counts.get(result.run_id, 0):>2} nodes"
        if notify:
            line += f"  {notify}"
        for error in result.errors:
            line += f"  error in {error.node_id}: {error.message}"
        print(line)
        failures += result.status != "completed"
    total_nodes = sum(node_counts.values())
    print(f"{len(results) - failures}/{len(results)} runs completed, {total_nodes} node "
          f"executions in {elapsed:.2f}s")
    if results:
        print("context of the first run:")
        print(json.dumps(results[0].context, indent=2, default=str))
    return 0 if failures == 0 else 1
