"""flowcraft: declarative workflow graphs, in one process or over SQS/DynamoDB and Azure.

The public API lives here; submodules not re-exported are internal.

Names are imported on first use (module ``__getattr__``): building the blueprint models
and the runtime costs a few hundred milliseconds that a process which only needs, say,
an error class or ``--help`` should not pay.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analysis import BlueprintAnalysis, analyze_blueprint, generate_mermaid
    from .blueprint import (
        EdgeDefinition,
        NodeConfig,
        NodeDefinition,
        WorkflowBlueprint,
        load_blueprint,
        load_blueprints,
    )
    from .context import AsyncContext, InMemoryContext, PatchOperation, TrackedContext
    from .core.middleware import Middleware
    from .errors import (
        BlueprintValidationError,
        BlueprintVersionMismatchError,
        ContextTooLargeError,
        ExpressionError,
        FlowcraftError,
        InvalidContextError,
        InvalidJobError,
        InvalidOptionError,
        NodeExecutionError,
        NodeTimeoutError,
        NonRetryableError,
        RunAlreadyExistsError,
        UnknownBlueprintError,
        UnstorableValueError,
    )
    from .events import EventBus, EventStore, FlowcraftEvent, InMemoryEventBus, InMemoryEventStore
    from .expressions import evaluate
    from .flow import Flow
    from .lint import LintIssue, lint_blueprint
    from .nodes import BaseNode, CancellationSignal, NodeContext, NodeResult
    from .replay import ReplayStep, replay, replay_context
    from .runtime import FlowRuntime, NodeError, RuntimeOptions, Step, Stepper, WorkflowResult

__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY: dict[str, str] = {
    "BlueprintAnalysis": "analysis",
    "analyze_blueprint": "analysis",
    "generate_mermaid": "analysis",
    "EdgeDefinition": "blueprint",
    "NodeConfig": "blueprint",
    "NodeDefinition": "blueprint",
    "WorkflowBlueprint": "blueprint",
    "load_blueprint": "blueprint",
    "load_blueprints": "blueprint",
    "AsyncContext": "context",
    "InMemoryContext": "context",
    "PatchOperation": "context",
    "TrackedContext": "context",
    "BlueprintValidationError": "errors",
    "BlueprintVersionMismatchError": "errors",
    "ContextTooLargeError": "errors",
    "ExpressionError": "errors",
    "FlowcraftError": "errors",
    "UnstorableValueError": "errors",
    "RunAlreadyExistsError": "errors",
    "NonRetryableError": "errors",
    "InvalidContextError": "errors",
    "InvalidJobError": "errors",
    "InvalidOptionError": "errors",
    "NodeExecutionError": "errors",
    "NodeTimeoutError": "errors",
    "UnknownBlueprintError": "errors",
    "EventBus": "events",
    "FlowcraftEvent": "events",
    "InMemoryEventBus": "events",
    "EventStore": "events",
    "InMemoryEventStore": "events",
    "Middleware": "core.middleware",
    "ReplayStep": "replay",
    "replay": "replay",
    "replay_context": "replay",
    "evaluate": "expressions",
    "Flow": "flow",
    "LintIssue": "lint",
    "lint_blueprint": "lint",
    "BaseNode": "nodes",
    "CancellationSignal": "nodes",
    "NodeContext": "nodes",
    "NodeResult": "nodes",
    "FlowRuntime": "runtime",
    "NodeError": "runtime",
    "RuntimeOptions": "runtime",
    "WorkflowResult": "runtime",
    "Step": "runtime",
    "Stepper": "runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowcraft' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AsyncContext",
    "BaseNode",
    "BlueprintAnalysis",
    "BlueprintValidationError",
    "BlueprintVersionMismatchError",
    "CancellationSignal",
    "ContextTooLargeError",
    "EdgeDefinition",
    "EventBus",
    "EventStore",
    "ExpressionError",
    "Flow",
    "FlowRuntime",
    "FlowcraftError",
    "FlowcraftEvent",
    "InMemoryContext",
    "InMemoryEventBus",
    "InMemoryEventStore",
    "InvalidContextError",
    "InvalidJobError",
    "InvalidOptionError",
    "LintIssue",
    "Middleware",
    "NodeConfig",
    "NodeContext",
    "NodeDefinition",
    "NodeError",
    "NodeExecutionError",
    "NodeResult",
    "NodeTimeoutError",
    "NonRetryableError",
    "PatchOperation",
    "ReplayStep",
    "RunAlreadyExistsError",
    "RuntimeOptions",
    "Step",
    "Stepper",
    "TrackedContext",
    "UnknownBlueprintError",
    "UnstorableValueError",
    "WorkflowBlueprint",
    "WorkflowResult",
    "__version__",
    "analyze_blueprint",
    "evaluate",
    "generate_mermaid",
    "lint_blueprint",
    "load_blueprint",
    "load_blueprints",
    "replay",
    "replay_context",
]
