"""Distributed execution: the job algorithm once, over any queue and database."""

from .adapter import BaseDistributedAdapter, QueueMessage, parse_timestamp
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
    "JobPayload",
    "QueueMessage",
    "ReconcileStats",
    "Reconciler",
    "WorkerOptions",
    "parse_job",
    "parse_timestamp",
]
