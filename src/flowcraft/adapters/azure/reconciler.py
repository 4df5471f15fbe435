"""``create_azure_reconciler``: find runs that stopped making progress and resume them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from ...distributed.reconciler import Reconciler
from ._cosmos import strip_system
from .adapter import AzureQueueAdapter


def create_azure_reconciler(
    adapter: AzureQueueAdapter,
    cosmos_client: Any,
    cosmos_database_name: str = "flowcraft-db",
    status_container_name: str = "statuses",
    stalled_threshold_seconds: float = 300.0,
) -> Reconciler:
    """A reconciler over the status container: ``stats = await reconciler.run()``.

    It queries every page of ``running`` runs not updated within the threshold (across
    partitions, so records written by clients without ``runId`` are found too), and
    re-enqueues their ready nodes (``lastUpdated`` as ISO-8601 or epoch seconds).
    """
    container = cosmos_client.get_database_client(cosmos_database_name).get_container_client(
        status_container_name)
    return Reconciler(adapter.run_client,
                      lambda: stalled_status_items(container, stalled_threshold_seconds),
                      stalled_threshold_seconds)


async def stalled_status_items(container: Any,
                               threshold_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """``running`` status items not updated within the threshold: ISO ``lastUpdated``
    compared in the query, other forms (epoch numbers) checked by the reconciler."""
    before = datetime.fromtimestamp(time.time() - threshold_seconds, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    items = container.query_items(
        "SELECT * FROM c WHERE c.status = @status AND "
        "(NOT IS_STRING(c.lastUpdated) OR c.lastUpdated < @before)",
        parameters=[{"name": "@status", "value": "running"},
                    {"name": "@before", "value": before}])
    async for item in items:
        record = strip_system(item)
        record.setdefault("runId", record.get("id"))
        yield record
