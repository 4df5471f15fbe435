"""``create_azure_reconciler``: find runs that stopped making progress and resume them."""

from __future__ import annotations

from typing import Any

from ...distributed.reconciler import Reconciler
from .adapter import AzureQueueAdapter, scan_status_container


def create_azure_reconciler(
    adapter: AzureQueueAdapter,
    cosmos_client: Any,
    cosmos_database_name: str = "flowcraft-db",
    status_container_name: str = "statuses",
    stalled_threshold_seconds: float = 300.0,
) -> Reconciler:
    """A reconciler over the status container: ``stats = await reconciler.run()``.

    It queries every page of ``running`` runs (across partitions, so records written
    by clients without ``runId`` are found too), and re-enqueues the ready nodes of
    those whose ``lastUpdated`` (ISO-8601 or epoch seconds) is older than the threshold.
    """
    container = cosmos_client.get_database_client(cosmos_database_name).get_container_client(
        status_container_name)
    return Reconciler(adapter, lambda: scan_status_container(container, "running"),
                      stalled_threshold_seconds)
