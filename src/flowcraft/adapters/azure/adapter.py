"""``AzureQueueAdapter``: workers that take jobs from Azure Queue Storage, state in Cosmos DB.

The job algorithm, polling loop and client side are
:class:`~flowcraft.distributed.adapter.BaseDistributedAdapter`'s; this adapter only
builds their backend:

* the job queue: :class:`~flowcraft.adapters.azure.queue.AzureJobQueue` (base64
  messages, receives of up to 32 with a polling backoff, visibility updates,
  delayed sends for durable sleeps, ``<queue>-poison`` for poison messages,
  receives put back when a worker stops);
* the runs' contexts: one item per run in the context container
  (:class:`~flowcraft.adapters.azure.statuses.CosmosDbRunStore`);
* status records: one item per run in the status container, partitioned on
  ``/runId`` (:class:`~flowcraft.adapters.azure.statuses.CosmosDbStatusStore`).
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
from .queue import AzureJobQueue
from .statuses import CosmosDbRunStore, CosmosDbStatusStore
from .statuses import query_status_container as query_status_container
from .statuses import scan_status_container as scan_status_container


class AzureQueueAdapter(BaseDistributedAdapter):
    """A worker (and client) over Azure Queue Storage + Cosmos DB (+ Redis coordination).

    ``queue_client`` is an ``azure.storage.queue.aio.QueueClient``, ``cosmos_client`` an
    ``azure.cosmos.aio.CosmosClient``; ``payloads`` (a ``BlobPayloadStore``) keeps values too
    large for the item in Blob Storage (the claim check). Other keyword arguments are the
    :class:`~flowcraft.distributed.options.WorkerOptions`; an unknown one is a ``TypeError``.
    """

    retention_seconds = Delegated[float | None]("backend.statuses")
    """How long a finished run's status and context items are kept (Cosmos per-item
    ``ttl``); ``None`` keeps them. 30 days unless set."""
    max_visibility_seconds = AzureJobQueue.max_visibility_seconds
    max_poll_interval = Delegated[float]("backend.queue")
    """The longest pause between receives of an empty queue (no long polling)."""

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        queue_client: Any,
        cosmos_client: Any,
        cosmos_database_name: str = "flowcraft-db",
        context_container_name: str = "contexts",
        status_container_name: str = "statuses",
        *,
        max_poll_interval: float = 1.0,
        poison_queue_client: Any = None,
        event_bus: EventBus | None = None,
        payloads: PayloadStore | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        check_option_names("AzureQueueAdapter", options,
                           extra=("max_poll_interval", "poison_queue_client", "event_bus",
                                  "payloads"))
        options.setdefault("batch_size", 32)
        check_worker_options({**options, "max_poll_interval": max_poll_interval},
                             max_lease_seconds=self.max_visibility_seconds,
                             extra={"max_poll_interval": (0, None, False, False)})
        self.queue = queue_client
        self.cosmos_client = cosmos_client
        self.cosmos_database_name = cosmos_database_name
        self.context_container_name = context_container_name
        self.status_container_name = status_container_name
        self._max_poll_interval = max_poll_interval  # the queue's, once it is built
        self._poison_queue_client = poison_queue_client
        self.payloads = payloads
        super().__init__(runtime_options, coordination_store, event_bus, **options)
        if isinstance(self.backend.queue, AzureJobQueue):
            self.backend.queue.busy = lambda: bool(self.worker_loop.jobs)

    def create_backend(self) -> Backend:
        return Backend(
            AzureJobQueue(self.queue, visibility_seconds=self.lease_seconds,
                          max_poll_interval=self._max_poll_interval,
                          poison_queue_client=self._poison_queue_client),
            CosmosDbRunStore(self.cosmos_client, self.cosmos_database_name,
                             self.context_container_name, payloads=self.payloads),
            CosmosDbStatusStore(self.cosmos_client, self.cosmos_database_name,
                                self.status_container_name, self.context_container_name),
        )

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> RunPage:
        """A :class:`~flowcraft.client.RunPage`: a query across partitions ordered by
        ``lastUpdated`` (newest first), paged with the server's continuation token."""
        store = self.backend.statuses
        if not isinstance(store, IndexedStatusStore):
            raise TypeError(f"the status store {type(store).__name__} has no index to list")
        return await store.list_statuses(statuses, blueprint_id=blueprint_id, since=since,
                                         limit=limit, cursor=cursor)
