"""What every engine is configured with: :class:`RuntimeOptions`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..blueprint import WorkflowBlueprint
from ..events import EventBus


@dataclass
class RuntimeOptions:
    """What a runtime carries to a distributed adapter: blueprints, registry, dependencies."""

    blueprints: dict[str, WorkflowBlueprint]
    registry: dict[str, Any]
    dependencies: dict[str, Any]
    event_bus: EventBus | None = None
    max_inline_sleep_seconds: float = 300.0
    max_node_iterations: int = 1000
    middleware: list[Any] = field(default_factory=list)
