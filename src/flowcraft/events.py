"""Events the engine emits while a run progresses.

Types: ``workflow:start``, ``workflow:finish``, ``node:start``, ``node:finish``,
``node:error``, ``node:retry``, ``node:fallback``, ``node:skipped``,
``edge:evaluate``, ``context:change``, and from distributed workers
``job:enqueued``, ``job:processed``, ``job:failed``. Every payload carries
``runId`` (and ``nodeId`` where a node is concerned).

Pass any object with an ``async emit(event)`` method as ``event_bus``. The
engine awaits ``emit``; a bus that raises is logged and ignored, so a broken
listener never breaks a run.

An :class:`EventStore` keeps a run's events for later (``FlowRuntime(event_store=...)``):
every event is appended under its ``runId`` as a JSON-safe copy, so the log reads the
same after the run changed its values, and :func:`flowcraft.replay.replay` rebuilds
the run's state at each step from it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("flowcraft.events")


@dataclass(frozen=True, slots=True)
class FlowcraftEvent:
    type: str
    payload: dict[str, Any] = field(default_factory=dict)


class EventBus(Protocol):
    async def emit(self, event: FlowcraftEvent) -> None: ...


Listener = Callable[[FlowcraftEvent], "Awaitable[None] | None"]


class InMemoryEventBus:
    """Calls listeners in order and optionally keeps every event (``history``)."""

    def __init__(self, *, keep_history: bool = True) -> None:
        self._listeners: list[tuple[str | None, Listener]] = []
        self.keep_history = keep_history
        self.history: list[FlowcraftEvent] = []

    def subscribe(self, listener: Listener, event_type: str | None = None) -> None:
        """Call ``listener`` for every event, or only for ``event_type``."""
        self._listeners.append((event_type, listener))

    async def emit(self, event: FlowcraftEvent) -> None:
        if self.keep_history:
            self.history.append(event)
        for wanted, listener in self._listeners:
            if wanted is None or wanted == event.type:
                outcome = listener(event)
                if outcome is not None:
                    await outcome

    def of_type(self, event_type: str) -> list[FlowcraftEvent]:
        return [event for event in self.history if event.type == event_type]


async def safe_emit(bus: EventBus | None, event: FlowcraftEvent) -> None:
    if bus is None:
        return
    try:
        await bus.emit(event)
    except Exception:
        logger.exception("event listener failed on %s", event.type)


class EventStore(Protocol):
    """Where a run's events are kept: ``append`` in order, ``events`` in the same order."""

    async def append(self, run_id: str, event: FlowcraftEvent) -> None: ...

    async def events(self, run_id: str) -> list[FlowcraftEvent]: ...


def event_to_dict(event: FlowcraftEvent) -> dict[str, Any]:
    return {"type": event.type, "payload": event.payload}


def event_from_dict(value: Any) -> FlowcraftEvent:
    """An event from its dict form ``{"type": ..., "payload": {...}}`` (or an event)."""
    if isinstance(value, FlowcraftEvent):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"not an event (a JSON object with a string 'type'): {value!r:.80}")
    payload = value.get("payload")
    return FlowcraftEvent(value["type"], dict(payload) if isinstance(payload, dict) else {})


def _snapshot(payload: dict[str, Any]) -> dict[str, Any]:
    # A copy: a node may change its output or a context value in place after the event.
    copied: dict[str, Any] = json.loads(json.dumps(payload, default=repr))
    return copied


class InMemoryEventStore:
    """Keeps every run's events in this process (``store.events(run_id)``)."""

    def __init__(self) -> None:
        self._runs: dict[str, list[FlowcraftEvent]] = {}

    async def append(self, run_id: str, event: FlowcraftEvent) -> None:
        self._runs.setdefault(run_id, []).append(event)

    async def events(self, run_id: str) -> list[FlowcraftEvent]:
        return list(self._runs.get(run_id, ()))

    def run_ids(self) -> list[str]:
        return list(self._runs)


class RecordingBus:
    """An event bus that appends each event to a store, then passes it to ``inner``."""

    def __init__(self, store: EventStore, inner: EventBus | None = None) -> None:
        self.store = store
        self.inner = inner

    async def emit(self, event: FlowcraftEvent) -> None:
        run_id = event.payload.get("runId")
        if isinstance(run_id, str):
            try:
                await self.store.append(run_id, FlowcraftEvent(event.type,
                                                               _snapshot(event.payload)))
            except Exception:  # the log is an observer: it never fails the run
                logger.exception("event store failed on %s", event.type)
        if self.inner is not None:
            await self.inner.emit(event)
