"""The engine-neutral core, shared by the in-memory runtime and the distributed workers.

* :mod:`~flowcraft.core.graph` — a blueprint as a graph (cycles, joins, dynamic nodes);
* :mod:`~flowcraft.core.routing` — routing records, edge conditions, joins, node inputs;
* :mod:`~flowcraft.core.successors` — the one function that decides what follows a
  finished (or skipped) node: which successors run, which are skipped, which wait;
* :mod:`~flowcraft.core.executor` — one node execution (retries, timeout, fallback);
* :mod:`~flowcraft.core.engine` — :class:`NodeEngine`: registry, node contexts, the
  storability checks;
* :mod:`~flowcraft.core.options` and :mod:`~flowcraft.core.results` — what an engine is
  given and what a run ends with.

Nothing here knows about queues, stores or tasks; it imports only the blueprint,
expression, context and node modules below it.
"""

from .engine import NodeEngine
from .executor import NodeError, NodeOutcome
from .graph import Graph
from .options import RuntimeOptions
from .results import WorkflowResult

__all__ = ["Graph", "NodeEngine", "NodeError", "NodeOutcome", "RuntimeOptions", "WorkflowResult"]
