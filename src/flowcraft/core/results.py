"""How a run ended, the same for every engine: :class:`WorkflowResult`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from .executor import NodeError

RunStatus = Literal["completed", "failed", "awaiting", "cancelled", "stalled"]


@dataclass
class WorkflowResult:
    """How a run ended. ``context`` hides the engine's ``_flowcraft.*`` bookkeeping;
    ``serialized_context`` is the complete state, as ``resume`` needs it."""

    status: RunStatus
    context: dict[str, Any]
    serialized_context: str
    errors: list[NodeError] = field(default_factory=list)
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "status": self.status,
            "context": self.context,
            "errors": [error.to_dict() for error in self.errors],
        }


def serialize_context(data: Mapping[str, Any]) -> str:
    return json.dumps(data, default=_json_default, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"context value of type {type(value).__name__} is not JSON serializable")
