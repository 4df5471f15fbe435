"""Claims that jobs of one run make at the same moment go out as one write.

A worker that receives several jobs of one run at once (a fan-out's branches, received
ten at a time) claims each from its copy of the run (:mod:`.snapshots`): a conditional
write per job, each returning only its lease. Those writes all hit the run's item, so
they can be one: a claim from a copy waits one turn of the event loop, and the claims of
the same run gathered by then go out together (``claim_together``: one conditional write
that takes every lease, counting every attempt, or none). When it takes none (one of the
nodes was done, leased elsewhere, or the run ended), each is claimed alone, which tells
each job why. A job whose wait was cancelled (the worker is stopping) gives back the
lease its claim took.

Claims that are not from a copy, claims of nodes that live in branch items
(:mod:`.homes`), stores without ``claim_together``, and batches that name one node twice
(a duplicate delivery) are made one by one, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .context import Claim, ClaimStatus, attempts_key
from .homes import BranchItemsContext

logger = logging.getLogger("flowcraft.distributed")

MAX_TOGETHER = 8
"""Claims in one write at most (DynamoDB caps an expression at 4 KB; a claim's condition
and update take about 350 characters of it with placeholders)."""


@dataclass(slots=True)
class _Request:
    context: BranchItemsContext
    node_id: str
    iteration: int
    owner: str
    base: Mapping[str, Any]
    future: asyncio.Future[Claim]


class ClaimBatcher:
    """Gathers one worker's claims from copies by run, one event-loop turn at a time."""

    def __init__(self) -> None:
        self._pending: dict[str, list[_Request]] = {}
        self._flushing: set[asyncio.Task[None]] = set()

    async def claim(self, context: BranchItemsContext, node_id: str, iteration: int,
                    owner: str, lease_seconds: float, base: Mapping[str, Any] | None) -> Claim:
        if base is None:
            return await context.claim(node_id, iteration, owner, lease_seconds)
        loop = asyncio.get_running_loop()
        request = _Request(context, node_id, iteration, owner, base, loop.create_future())
        pending = self._pending.get(context.run_id)
        if pending is None:
            pending = self._pending[context.run_id] = []
            loop.call_soon(self._flush, context.run_id, lease_seconds)
        pending.append(request)
        return await request.future

    def _flush(self, run_id: str, lease_seconds: float) -> None:
        requests = self._pending.pop(run_id, [])
        for start in range(0, len(requests), MAX_TOGETHER):
            task = asyncio.get_running_loop().create_task(
                self._claim_all(requests[start:start + MAX_TOGETHER], lease_seconds))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _claim_all(self, requests: list[_Request], lease_seconds: float) -> None:
        try:
            claims = await self._claims(requests, lease_seconds)
        except BaseException as exc:
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for request, claim in zip(requests, claims, strict=True):
            if not request.future.done():
                request.future.set_result(claim)
            elif claim.status is ClaimStatus.CLAIMED and claim.data is not None:
                # Nobody waits for it any more (the job was cancelled): give the lease back.
                await request.context.release(
                    request.node_id, request.owner,
                    attempts=int(claim.data.get(attempts_key(request.node_id)) or 1) - 1)

    @staticmethod
    async def _claims(requests: list[_Request], lease_seconds: float) -> list[Claim]:
        nodes = [request.node_id for request in requests]
        if len(requests) > 1 and len(set(nodes)) == len(nodes):
            first = requests[0]
            written = await first.context.claim_together(
                [(r.node_id, r.iteration, r.owner) for r in requests], lease_seconds,
                first.base)
            if written is not None:
                logger.debug("run %s: %d nodes claimed in one write", first.context.run_id,
                             len(requests))
                return [Claim(ClaimStatus.CLAIMED, {**r.base, **w}, r.owner)
                        for r, w in zip(requests, written, strict=True)]
        return list(await asyncio.gather(*(
            r.context.claim(r.node_id, r.iteration, r.owner, lease_seconds, base=r.base)
            for r in requests)))
