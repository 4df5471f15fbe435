"""``create_sqs_reconciler``: find runs that stopped making progress and resume them."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from ...distributed.reconciler import Reconciler
from .adapter import SqsAdapter
from .statuses import query_status_index, scan_status_table

logger = logging.getLogger("flowcraft.aws")


def create_sqs_reconciler(
    adapter: SqsAdapter,
    dynamodb_client: Any,
    status_table_name: str = "flowcraft-statuses",
    stalled_threshold_seconds: float = 300.0,
    *,
    use_index: bool = True,
) -> Reconciler:
    """A reconciler over the status table: ``stats = await reconciler.run()``.

    It queries the status index for ``running`` runs whose ``lastUpdated`` is older
    than ``stalled_threshold_seconds`` and re-enqueues their ready nodes. A table
    provisioned before the index existed (or ``use_index=False``) is scanned instead,
    every page, understanding ``lastUpdated`` as epoch seconds or ISO-8601. Keep the
    threshold above the workers' ``status_touch_seconds`` and ``lease_seconds``.
    """
    def candidates() -> AsyncIterator[dict[str, Any]]:
        if not use_index:
            return scan_status_table(dynamodb_client, status_table_name, "running")
        return stalled_through_index(dynamodb_client, status_table_name,
                                     stalled_threshold_seconds)

    return Reconciler(adapter.run_client, candidates, stalled_threshold_seconds)


async def stalled_through_index(client: Any, table_name: str,
                                threshold_seconds: float) -> AsyncIterator[dict[str, Any]]:
    """``running`` status items last updated before now minus the threshold, page by page
    (a Query of the status index); falls back to a scan when the table has no index."""
    before = datetime.fromtimestamp(time.time() - threshold_seconds, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    cursor = None
    while True:
        try:
            items, cursor = await query_status_index(client, table_name, ["running"],
                                                     before=before, limit=100, cursor=cursor)
        except client.exceptions.ClientError as exc:
            if "index" not in str(exc).lower() or cursor is not None:
                raise
            logger.warning("status table %s has no index status-lastUpdated (run `flowcraft "
                           "provision aws` to add it); scanning the table", table_name)
            async for item in scan_status_table(client, table_name, "running"):
                yield item
            return
        for item in items:
            yield item
        if cursor is None:
            return
