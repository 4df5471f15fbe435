"""The in-memory engine: :class:`FlowRuntime` and its step-by-step :class:`Stepper`.

The engine-neutral parts (graph, routing, executor, node engine, options, results) live
in :mod:`flowcraft.core`; they are re-exported here for convenience.
"""

from ..core.engine import NodeEngine
from ..core.executor import NodeError, NodeOutcome
from ..core.graph import Graph
from ..core.options import RuntimeOptions
from ..core.results import WorkflowResult
from .runtime import FlowRuntime
from .stepper import Step, Stepper

__all__ = ["FlowRuntime", "Graph", "NodeEngine", "NodeError", "NodeOutcome", "RuntimeOptions",
           "Step", "Stepper", "WorkflowResult"]
