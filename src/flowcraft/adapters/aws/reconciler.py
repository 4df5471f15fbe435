"""``create_sqs_reconciler``: find runs that stopped making progress and resume them."""

from __future__ import annotations

from typing import Any

from ...distributed.reconciler import Reconciler
from .adapter import SqsAdapter, scan_status_table


def create_sqs_reconciler(
    adapter: SqsAdapter,
    dynamodb_client: Any,
    status_table_name: str = "flowcraft-statuses",
    stalled_threshold_seconds: float = 300.0,
) -> Reconciler:
    """A reconciler over the status table: ``stats = await reconciler.run()``.

    It scans every page of the table for ``running`` runs whose ``lastUpdated``
    (epoch seconds or ISO-8601) is older than ``stalled_threshold_seconds`` and
    re-enqueues their ready nodes. Keep the threshold above the workers'
    ``status_touch_seconds`` and ``lease_seconds``.
    """
    return Reconciler(
        adapter,
        lambda: scan_status_table(dynamodb_client, status_table_name, "running"),
        stalled_threshold_seconds,
    )
