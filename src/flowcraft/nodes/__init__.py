"""Node implementations: the base types and the built-ins."""

from .base import BaseNode, CancellationSignal, NodeContext, NodeResult
from .builtins import BUILTIN_NODES

__all__ = ["BUILTIN_NODES", "BaseNode", "CancellationSignal", "NodeContext", "NodeResult"]
