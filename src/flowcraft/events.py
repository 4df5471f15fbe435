"""Events the engine emits while a run progresses.

Types: ``workflow:start``, ``workflow:finish``, ``node:start``, ``node:finish``,
``node:error``, ``node:retry``, ``node:fallback``, ``node:skipped``,
``edge:evaluate``, ``context:change``, and from distributed workers
``job:enqueued``, ``job:processed``, ``job:failed``. Every payload carries
``runId`` (and ``nodeId`` where a node is concerned).

Pass any object with an ``async emit(event)`` method as ``event_bus``. The
engine awaits ``emit``; a bus that raises is logged and ignored, so a broken
listener never breaks a run.
"""

from __future__ import annotations

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
