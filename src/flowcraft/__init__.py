"""flowcraft: declarative workflow graphs, in one process or over SQS/DynamoDB and Azure.

The public API lives here; submodules not re-exported are internal.
"""

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
from .errors import (
    BlueprintValidationError,
    BlueprintVersionMismatchError,
    ContextTooLargeError,
    ExpressionError,
    FlowcraftError,
    InvalidContextError,
    InvalidJobError,
    NodeExecutionError,
    NodeTimeoutError,
    NonRetryableError,
    RunAlreadyExistsError,
    UnknownBlueprintError,
    UnstorableValueError,
)
from .events import EventBus, FlowcraftEvent, InMemoryEventBus
from .expressions import evaluate
from .flow import Flow
from .nodes import BaseNode, CancellationSignal, NodeContext, NodeResult
from .runtime import FlowRuntime, NodeError, RuntimeOptions, WorkflowResult

__version__ = "0.1.0"

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
    "ExpressionError",
    "Flow",
    "FlowRuntime",
    "FlowcraftError",
    "FlowcraftEvent",
    "InMemoryContext",
    "InMemoryEventBus",
    "InvalidContextError",
    "InvalidJobError",
    "NodeConfig",
    "NodeContext",
    "NodeDefinition",
    "NodeError",
    "NodeExecutionError",
    "NodeResult",
    "NodeTimeoutError",
    "NonRetryableError",
    "PatchOperation",
    "RunAlreadyExistsError",
    "RuntimeOptions",
    "TrackedContext",
    "UnknownBlueprintError",
    "UnstorableValueError",
    "WorkflowBlueprint",
    "WorkflowResult",
    "__version__",
    "analyze_blueprint",
    "evaluate",
    "generate_mermaid",
    "load_blueprint",
    "load_blueprints",
]
