"""An AWS Lambda handler for an SQS event source.

``handler = make_sqs_handler(registry=..., blueprints=...)`` is the function Lambda
calls with an SQS event; it runs each record's job with the polling worker's algorithm
(records of one batch at once, up to ``concurrency``) and answers with a partial batch
response, ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}``: the event
source mapping must have ``function_response_types = ["ReportBatchItemFailures"]``.

What becomes of a record, by outcome:

* processed, duplicate, dropped, requeued: success — Lambda deletes the message. A
  dropped job was refused for good (its run failed where it has one; an unreadable
  body went to the queue's dead-letter queue);
* deferred (the node runs elsewhere, the run needs another blueprint version or a
  blueprint this function lacks): the message is made visible again after the wait
  (``ChangeMessageVisibility`` with the record's receipt handle) and reported as a
  batch item failure, so SQS delivers *the same message* again — no extra send, and its
  receive count tells a job that keeps failing from one that waits. Before that count
  reaches ``max_receive_count`` a job that only waited is sent as a fresh message
  instead (``requeued``), so the queue's redrive policy never dead-letters it;
* an unexpected error: a batch item failure; SQS redelivers after the visibility timeout.

The handler keeps one event loop and its clients (and dependencies) for the life of the
execution environment; they are opened on the first event.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Unpack

from ..blueprint import WorkflowBlueprint, load_blueprints
from ..distributed.adapter import BaseDistributedAdapter, QueueMessage
from ..distributed.options import WorkerOptions, check_option_names
from ..runtime.runtime import FlowRuntime
from ..worker import DependencyFactory, Hook
from . import _LazyAdapter

logger = logging.getLogger("flowcraft.serverless")


class SqsHandler:
    """``handler(event, context)`` for Lambda; ``await handler.process(event)`` inside a
    running event loop (then use only that loop)."""

    def __init__(self, adapter: _LazyAdapter) -> None:
        self._adapter = adapter
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(self.process(event))

    async def process(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The partial batch response for an SQS event."""
        records = event.get("Records")
        if not isinstance(records, list):
            raise ValueError("not an SQS event: it has no list of 'Records' (is the function "
                             "triggered by an SQS event source mapping?)")
        adapter = await self._adapter.get()
        slots = asyncio.Semaphore(adapter.concurrency)

        async def one(record: Mapping[str, Any]) -> str | None:
            async with slots:
                return await _process_record(adapter, record)

        failed = await asyncio.gather(*(one(record) for record in records))
        return {"batchItemFailures": [{"itemIdentifier": message_id}
                                      for message_id in failed if message_id is not None]}

    async def aclose(self) -> None:
        """Close clients and dependencies (for tests; Lambda simply ends the process)."""
        await self._adapter.aclose()

    def close(self) -> None:
        """:meth:`aclose` for the synchronous handler, and its event loop."""
        with self._lock:
            if self._loop is not None:
                self._loop.run_until_complete(self.aclose())
                self._loop.close()
                self._loop = None


async def _process_record(adapter: BaseDistributedAdapter,
                          record: Mapping[str, Any]) -> str | None:
    """Run one record's job; the message id when SQS must deliver it again, else None."""
    message_id = str(record.get("messageId") or "")
    attributes = record.get("attributes") or {}
    message = QueueMessage(
        body=record.get("body") or "",
        message_id=message_id,
        receive_count=int(attributes.get("ApproximateReceiveCount") or 1),
        handle=record.get("receiptHandle"),
    )
    try:
        outcome, delay = await adapter.handle_message(message)
    except Exception:
        logger.exception("message %s: unexpected error; SQS will deliver it again", message_id)
        return message_id
    if outcome != "deferred":
        return None
    if message.handle is not None:
        try:
            # The wait the job needs, not the queue's visibility timeout.
            await adapter.backend.queue.set_visibility(message, delay)
        except Exception as exc:
            logger.warning("message %s: could not shorten its visibility (it comes back after "
                           "the visibility timeout): %s", message_id, exc)
    return message_id


def make_sqs_handler(
    *,
    registry: Mapping[str, Any],
    blueprints: Mapping[str, WorkflowBlueprint] | str | Path,
    dependencies: Mapping[str, Any] | DependencyFactory | None = None,
    on_startup: Iterable[Hook] = (),
    settings: Any = None,
    calls: Counter[str] | None = None,
    **options: Unpack[WorkerOptions],
) -> SqsHandler:
    """A Lambda handler for SQS events. Connection settings come from the environment
    (``SQS_QUEUE_URL`` or ``FLOWCRAFT_QUEUE_NAME``, table names, ``AWS_REGION``, as for
    ``flowcraft worker aws``) unless ``settings`` (an ``AwsSettings``) is given;
    ``dependencies`` and ``on_startup`` are :class:`~flowcraft.worker.Worker`'s, run on the
    first event; ``options`` are the :class:`~flowcraft.distributed.options.WorkerOptions`
    (``lease_seconds`` should not exceed the queue's visibility timeout)."""
    from ..adapters import connect as backends

    check_option_names("make_sqs_handler", options)
    if isinstance(blueprints, str | Path):
        blueprints = load_blueprints(blueprints)
    runtime_options = FlowRuntime(blueprints=blueprints, registry=registry).options
    resolved = settings if settings is not None else backends.AwsSettings.resolve()

    def open_adapter() -> AbstractAsyncContextManager[BaseDistributedAdapter]:
        return backends.aws_adapter(resolved, runtime_options, calls, **options)

    return SqsHandler(_LazyAdapter(runtime_options, open_adapter, dependencies, on_startup))
