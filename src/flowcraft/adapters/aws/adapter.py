"""``SqsAdapter``: workers that take jobs from Amazon SQS and keep state in DynamoDB.

The job algorithm, polling loop and client side are
:class:`~flowcraft.distributed.adapter.BaseDistributedAdapter`'s; this adapter only
builds their backend:

* the job queue: :class:`~flowcraft.adapters.aws.queue.SqsJobQueue` (long polling,
  batched deletes and sends, delays for durable sleeps, the queue's dead-letter
  queue for poison messages, receives put back when a worker stops);
* the runs' contexts: one item per run in the context table
  (:class:`~flowcraft.adapters.aws.statuses.DynamoDbRunStore`);
* status records: one item per run in the status table, listed through its
  ``status-lastUpdated`` index
  (:class:`~flowcraft.adapters.aws.statuses.DynamoDbStatusStore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Unpack

from ...core.options import RuntimeOptions
from ...distributed.adapter import BaseDistributedAdapter, Delegated
from ...distributed.backend import Backend, IndexedStatusStore, RunPage
from ...distributed.coordination import CoordinationStore
from ...distributed.options import WorkerOptions, check_option_names
from ...events import EventBus
from .._worker import check_worker_options
from ..claimcheck import PayloadStore
from .queue import SqsJobQueue
from .statuses import DynamoDbRunStore, DynamoDbStatusStore
from .statuses import query_status_index as query_status_index
from .statuses import scan_status_table as scan_status_table


class SqsAdapter(BaseDistributedAdapter):
    """A worker (and client) over SQS + DynamoDB.

    ``sqs_client`` and ``dynamodb_client`` are aiobotocore clients; see
    ``docs/aws.md`` for a complete worker. ``payloads`` (an ``S3PayloadStore``) keeps values
    too large for the item in S3 (the claim check). Other keyword arguments are the
    :class:`~flowcraft.distributed.options.WorkerOptions` (``concurrency``,
    ``lease_seconds``, ...); an unknown one is a ``TypeError``.
    """

    max_visibility_seconds = SqsJobQueue.max_visibility_seconds
    retention_seconds = Delegated[float | None]("backend.statuses")
    """How long a finished run's context and status items are kept (DynamoDB TTL on the
    status item's ``ttl`` and the context item's ``_flowcraft.ttl``); ``None`` keeps them.
    30 days unless set."""
    delete_batch_seconds = Delegated[float]("backend.queue")
    """How long deletes are gathered for one ``DeleteMessageBatch``."""

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        sqs_client: Any,
        dynamodb_client: Any,
        queue_url: str,
        context_table_name: str = "flowcraft-contexts",
        status_table_name: str = "flowcraft-statuses",
        *,
        event_bus: EventBus | None = None,
        payloads: PayloadStore | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        check_option_names("SqsAdapter", options, extra=("event_bus", "payloads"))
        check_worker_options(options, max_lease_seconds=self.max_visibility_seconds)
        if not queue_url:
            raise ValueError("SqsAdapter needs a queue_url (set SQS_QUEUE_URL)")
        self.sqs = sqs_client
        self.dynamodb = dynamodb_client
        self.queue_url = queue_url
        self.context_table_name = context_table_name
        self.status_table_name = status_table_name
        self.payloads = payloads
        super().__init__(runtime_options, coordination_store, event_bus, **options)

    def create_backend(self) -> Backend:
        return Backend(
            SqsJobQueue(self.sqs, self.queue_url, visibility_seconds=self.lease_seconds),
            DynamoDbRunStore(self.dynamodb, self.context_table_name, payloads=self.payloads),
            DynamoDbStatusStore(self.dynamodb, self.status_table_name, self.context_table_name),
        )

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> RunPage:
        """A :class:`~flowcraft.distributed.backend.RunPage` through the status index (no
        scan)."""
        store = self.backend.statuses
        if not isinstance(store, IndexedStatusStore):
            raise TypeError(f"the status store {type(store).__name__} has no index to list")
        return await store.list_statuses(statuses, blueprint_id=blueprint_id, since=since,
                                         limit=limit, cursor=cursor)
