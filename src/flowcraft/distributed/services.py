"""``WorkerServices``: what a node gets as ``ctx.engine`` on a worker: durable sleep and
in-process subflows."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..core.engine import NodeEngine
from ..nodes.base import NodeContext
from ..runtime.runtime import run_subflow


class WorkerServices:
    """``ctx.engine`` on a worker: durable sleep and in-process subflows."""

    def __init__(self, engine: NodeEngine) -> None:
        self._engine = engine
        self.wake_up_at: float | None = None

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        if seconds <= 1.0:
            await asyncio.sleep(seconds)
            return
        # Durable: the node completes now; its successors are enqueued with a delay.
        self.wake_up_at = time.time() + seconds

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        return await run_subflow(self._engine, ctx, blueprint_id)
