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
    InvalidJobError,
    InvalidOptionError,
    NodeExecutionError,
    NodeTimeoutError,
    UnknownBlueprintError,
)
from .events import EventBus, FlowcraftEvent, InMemoryEventBus
from .expressions import evaluate
from .flow import Flow
from .lint import LintIssue, lint_blueprint
from .nodes import BaseNode, CancellationSignal, NodeContext, NodeResult
from .runtime import FlowRuntime, NodeError, RuntimeOptions, Step, Stepper, WorkflowResult

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
    "InvalidJobError",
    "InvalidOptionError",
    "LintIssue",
    "NodeConfig",
    "NodeContext",
    "NodeDefinition",
    "NodeError",
    "NodeExecutionError",
    "NodeResult",
    "NodeTimeoutError",
    "PatchOperation",
    "RuntimeOptions",
    "Step",
    "Stepper",
    "TrackedContext",
    "UnknownBlueprintError",
    "WorkflowBlueprint",
    "WorkflowResult",
    "__version__",
    "analyze_blueprint",
    "evaluate",
    "generate_mermaid",
    "lint_blueprint",
    "load_blueprint",
    "load_blueprints",
]
