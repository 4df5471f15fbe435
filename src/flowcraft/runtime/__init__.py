"""In-memory execution and the workflow logic shared with distributed workers."""

from .executor import NodeError, NodeOutcome
from .graph import Graph
from .runtime import FlowRuntime, NodeEngine, RuntimeOptions, WorkflowResult
from .stepper import Step, Stepper

__all__ = ["FlowRuntime", "Graph", "NodeEngine", "NodeError", "NodeOutcome", "RuntimeOptions",
           "Step", "Stepper", "WorkflowResult"]
