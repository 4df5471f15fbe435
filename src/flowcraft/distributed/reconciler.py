"""Finding and resuming stalled runs, independent of the cloud.

A run is *stalled* when its status is ``running`` and its ``lastUpdated`` is
older than ``stalled_threshold_seconds`` (workers touch it while they make
progress). ``lastUpdated`` is understood both as epoch seconds (or
milliseconds) and as an ISO-8601 string, which is what the TypeScript
clients write. Every page of the status scan is read.

For each stalled run :meth:`~flowcraft.distributed.runs.RunClient.reconcile`
re-enqueues the ready frontier, and the run's ``lastUpdated`` is refreshed
(:meth:`~flowcraft.distributed.backend.StatusStore.write`) so the next pass
leaves it alone unless it stalls again.

The candidates are the status store's ``running`` records
(:meth:`~flowcraft.distributed.backend.StatusStore.scan`) unless a narrower
query is given: the cloud reconcilers (``create_sqs_reconciler``,
``create_azure_reconciler``) ask their index or container for the runs not
updated within the threshold only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .backend import Backend, now_iso, parse_timestamp

logger = logging.getLogger("flowcraft.reconciler")


@dataclass
class ReconcileStats:
    scanned_items: int = 0
    stalled_runs: int = 0
    reconciled_runs: int = 0
    failed_runs: int = 0
    """Stalled runs whose reconciliation raised an error (logged with the run id)."""

    def to_dict(self) -> dict[str, int]:
        return {"scannedItems": self.scanned_items, "stalledRuns": self.stalled_runs,
                "reconciledRuns": self.reconciled_runs, "failedRuns": self.failed_runs}


StatusScan = Callable[[], AsyncIterator[dict[str, Any]]]


class Reconcilable(Protocol):
    """What repairs runs: an adapter, or its :class:`~flowcraft.distributed.runs.RunClient`
    (``adapter.run_client``); its backend's status store holds the records."""

    @property
    def backend(self) -> Backend: ...

    async def reconcile(self, run_id: str) -> list[str]: ...


class Reconciler:
    """``await reconciler.run()`` once, or ``await reconciler.run_every(60)``.

    Args:
        adapter: reconciles one run (an adapter or its ``run_client``); the lastUpdated of
            a reconciled run is written to its backend's status store.
        scan: the candidate records (default: every ``running`` record of that store).
        stalled_threshold_seconds: a ``running`` run not updated for this long is stalled.
    """

    def __init__(self, adapter: Reconcilable, scan: StatusScan | None = None,
                 stalled_threshold_seconds: float = 300.0) -> None:
        self.adapter = adapter
        statuses = adapter.backend.statuses
        self.scan: StatusScan = scan if scan is not None else (
            lambda: statuses.scan("running"))
        self.stalled_threshold_seconds = stalled_threshold_seconds

    def is_stalled(self, item: dict[str, Any], now: float) -> bool:
        if item.get("status") != "running":
            return False
        updated = parse_timestamp(item.get("lastUpdated"))
        return updated is None or now - updated >= self.stalled_threshold_seconds

    async def run(self) -> ReconcileStats:
        stats = ReconcileStats()
        now = time.time()
        async for item in self.scan():
            stats.scanned_items += 1
            if not self.is_stalled(item, now):
                continue
            stats.stalled_runs += 1
            run_id = str(item.get("runId") or item.get("id"))
            try:
                await self.adapter.reconcile(run_id)
                await self.adapter.backend.statuses.write(run_id, {"lastUpdated": now_iso()},
                                                          only_if_running=True)
                stats.reconciled_runs += 1
            except Exception as exc:
                stats.failed_runs += 1
                logger.error("run %s: reconciliation failed: %s", run_id, exc)
        if stats.stalled_runs:
            logger.info("reconciler: scanned %d, stalled %d, reconciled %d, failed %d",
                        stats.scanned_items, stats.stalled_runs, stats.reconciled_runs,
                        stats.failed_runs)
        return stats

    async def run_every(self, interval_seconds: float,
                        stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.run()
            except Exception:
                logger.exception("reconciler pass failed; trying again next interval")
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
            except TimeoutError:
                pass
