"""``WorkerServices``: what a node gets as ``ctx.engine`` on a worker: durable sleep,
in-process subflows, and map ledgers for large ``batch-scatter`` maps."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ..core.engine import NodeEngine
from ..nodes.base import NodeContext, NodeResult
from ..runtime.runtime import run_subflow

if TYPE_CHECKING:
    from .ledger import MapLedger, MapPlan


class WorkerServices:
    """``ctx.engine`` on a worker: durable sleep, in-process subflows and, with a
    ``ledger``, map ledgers (:mod:`flowcraft.distributed.ledger`)."""

    def __init__(self, engine: NodeEngine, ledger: MapLedger | None = None) -> None:
        self._engine = engine
        self._ledger = ledger
        self.wake_up_at: float | None = None
        self.map_plan: MapPlan | None = None
        """Set when the node's map runs as a ledger: the job algorithm starts it."""

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        if seconds <= 1.0:
            await asyncio.sleep(seconds)
            return
        # Durable: the node completes now; its successors are enqueued with a delay.
        self.wake_up_at = time.time() + seconds

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        return await run_subflow(self._engine, ctx, blueprint_id)

    async def start_map(self, ctx: NodeContext, items: list[Any], worker_uses: str,
                        gather_id: str, chunk_size: int | None) -> NodeResult | None:
        """Take a ``batch-scatter``'s map over as a ledger (``None``: it adds nodes)."""
        if self._ledger is None:
            return None
        plan = self._ledger.plan(items, worker_uses, gather_id, chunk_size)
        if plan is None:
            return None
        self.map_plan = plan
        return NodeResult(output=None)
