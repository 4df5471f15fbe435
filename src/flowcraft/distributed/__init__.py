"""Distributed execution: the job algorithm once, over any queue and database.

An adapter (:class:`BaseDistributedAdapter`) composes a :class:`Backend` (job queue,
run store, status store), the job algorithm, a polling loop and the client side; see
:mod:`flowcraft.distributed.adapter`.
"""

from .adapter import BaseDistributedAdapter
from .backend import (
    Backend,
    IndexedStatusStore,
    JobQueue,
    QueueMessage,
    RunStore,
    StatusStore,
    parse_timestamp,
)
from .context import Claim, ClaimStatus, DistributedContext, InMemoryRunStore
from .coordination import (
    CoordinationStore,
    FullCoordinationStore,
    InMemoryCoordinationStore,
)
from .inprocess import InProcessAdapter, InProcessQueue
from .job import JobPayload, parse_job
from .options import WorkerOptions
from .reconciler import Reconciler, ReconcileStats

__all__ = [
    "Backend",
    "BaseDistributedAdapter",
    "Claim",
    "ClaimStatus",
    "CoordinationStore",
    "DistributedContext",
    "FullCoordinationStore",
    "InMemoryCoordinationStore",
    "InMemoryRunStore",
    "InProcessAdapter",
    "InProcessQueue",
    "IndexedStatusStore",
    "JobPayload",
    "JobQueue",
    "QueueMessage",
    "ReconcileStats",
    "Reconciler",
    "RunStore",
    "StatusStore",
    "WorkerOptions",
    "parse_job",
    "parse_timestamp",
]
