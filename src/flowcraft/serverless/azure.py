"""An Azure Functions queue trigger.

``handle = make_queue_handler(registry=..., blueprints=...)`` is an async function that
takes what a queue trigger binds — a ``func.QueueMessage`` (any object with
``get_body()``, and optionally ``id`` and ``dequeue_count``), or the message text as
``str`` / ``bytes`` — runs its job with the polling worker's algorithm and returns the
outcome. This module does not import ``azure-functions``.

What becomes of a message, by outcome:

* processed, duplicate, dropped, requeued: the function returns and Functions deletes
  the message. An unreadable message was copied to ``<queue>-poison`` first (the queue
  Functions itself uses), its run failed where it names one;
* deferred (the node runs elsewhere, the run needs another blueprint version or a
  blueprint this app lacks): a trigger cannot delay its own message (Functions retries
  a failed one after ``visibilityTimeout``, default 0 s, and poisons it after
  ``maxDequeueCount``), so the job is sent again as a fresh message, invisible for the
  wait, and ``"requeued"`` returned: it is never dropped and never poisoned for waiting;
* an unexpected error: raised, so Functions retries the message and moves it to
  ``<queue>-poison`` after ``maxDequeueCount`` deliveries.

Clients, dependencies and startup hooks are opened on the first message, on the event
loop of that call, and kept for the process (Functions runs async functions on one loop).
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Unpack

from ..blueprint import WorkflowBlueprint, load_blueprints
from ..distributed.adapter import BaseDistributedAdapter, JobOutcome, QueueMessage
from ..distributed.options import WorkerOptions, check_option_names
from ..runtime.runtime import FlowRuntime
from ..worker import DependencyFactory, Hook
from . import _LazyAdapter


class QueueHandler:
    """``await handler(message)`` in a queue-triggered function."""

    def __init__(self, adapter: _LazyAdapter) -> None:
        self._adapter = adapter

    async def __call__(self, message: Any) -> JobOutcome:
        adapter = await self._adapter.get()
        outcome, _ = await adapter.handle_message(queue_message(message), requeue_deferred=True)
        return outcome

    async def aclose(self) -> None:
        """Close clients and dependencies (for tests; Functions ends the process)."""
        await self._adapter.aclose()


def queue_message(message: Any) -> QueueMessage:
    """A trigger's message as the job algorithm sees it. It has no pop receipt
    (``handle=None``): the trigger, not the algorithm, deletes it."""
    if isinstance(message, str | bytes):
        return QueueMessage(body=message, message_id=f"trigger-{uuid.uuid4().hex[:12]}")
    get_body = getattr(message, "get_body", None)
    if not callable(get_body):
        raise TypeError(f"a queue trigger message must be str, bytes or have get_body() "
                        f"(func.QueueMessage), not {type(message).__name__}")
    body = get_body()
    if not isinstance(body, str | bytes):
        raise TypeError(f"get_body() returned {type(body).__name__}, not bytes or str")
    count = getattr(message, "dequeue_count", None)
    return QueueMessage(
        body=body,
        message_id=str(getattr(message, "id", None) or f"trigger-{uuid.uuid4().hex[:12]}"),
        receive_count=count if isinstance(count, int) and count > 0 else 1,
    )


def make_queue_handler(
    *,
    registry: Mapping[str, Any],
    blueprints: Mapping[str, WorkflowBlueprint] | str | Path,
    dependencies: Mapping[str, Any] | DependencyFactory | None = None,
    on_startup: Iterable[Hook] = (),
    settings: Any = None,
    calls: Counter[str] | None = None,
    **options: Unpack[WorkerOptions],
) -> QueueHandler:
    """A queue-trigger handler. Connection settings come from the environment
    (``AZURE_STORAGE_CONNECTION_STRING``, ``COSMOS_DB_CONNECTION_STRING``,
    ``REDIS_CONNECTION_STRING``, names as for ``flowcraft worker azure``) unless
    ``settings`` (an ``AzureSettings``) is given; ``dependencies`` and ``on_startup`` are
    :class:`~flowcraft.worker.Worker`'s, run on the first message; ``options`` are the
    :class:`~flowcraft.distributed.options.WorkerOptions`."""
    from ..adapters import connect as backends

    check_option_names("make_queue_handler", options)
    if isinstance(blueprints, str | Path):
        blueprints = load_blueprints(blueprints)
    runtime_options = FlowRuntime(blueprints=blueprints, registry=registry).options
    resolved = settings if settings is not None else backends.AzureSettings.resolve()

    def open_adapter() -> AbstractAsyncContextManager[BaseDistributedAdapter]:
        return backends.azure_adapter(resolved, runtime_options, calls, **options)

    return QueueHandler(_LazyAdapter(runtime_options, open_adapter, dependencies, on_startup))
