"""``NodeEngine``: runs single nodes for every engine (in memory and on workers).

It looks implementations up in the registry, builds each node's context, runs
the shared executor (retries, timeout, fallback, middleware) and refuses, in
one place for every engine, what no store can hold: ``NodeEngine.graph``
checks a blueprint's expressions and registry before any node runs, and
``NodeEngine.run_node`` fails a node (once: no retry, no fallback) whose
output or context writes are not plain JSON, dropping those writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from ..blueprint import NodeDefinition, WorkflowBlueprint, check_blueprint
from ..context import TrackedContext, check_storable, squash
from ..errors import UnknownBlueprintError, UnstorableValueError
from ..nodes.base import CancellationSignal, EngineServices, NodeContext
from ..nodes.builtins import BUILTIN_NODES
from .executor import NodeError, NodeOutcome, execute_node
from .graph import Graph
from .options import RuntimeOptions

logger = logging.getLogger("flowcraft.runtime")


_MISSING = object()


class RunContext(TrackedContext):
    """A :class:`TrackedContext` that remembers each key's value from before the node's first
    write to it, so writes the store cannot hold are undone instead of left in the run."""

    __slots__ = ("_before",)
    _before: dict[str, Any]

    def _remember(self, key: str) -> None:
        try:
            before = self._before
        except AttributeError:  # created on the first write: most nodes never write
            before = self._before = {}
        if key not in before:
            before[key] = self.data.get(key, _MISSING)

    def set_now(self, key: str, value: Any) -> None:
        self._remember(key)
        super().set_now(key, value)

    def delete_now(self, key: str) -> bool:
        self._remember(key)
        return super().delete_now(key)

    def undo(self, key: str, written: Any) -> None:
        if self.data.get(key, _MISSING) is not written:
            return  # another node wrote the key since: keep its value
        before = getattr(self, "_before", {}).get(key, _MISSING)
        if before is _MISSING:
            self.data.pop(key, None)
        else:
            self.data[key] = before


def _write_name(node_id: str, key: str) -> str:
    return f"context key '{key}' written by node '{node_id}'"


def _plain_scalar(value: Any) -> bool:
    """The common case, decided without a call: a storable scalar."""
    kind = type(value)
    return kind in _PLAIN_SCALARS or (kind is float and math.isfinite(value))


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def refuse_unstorable(node: NodeDefinition, tracked: TrackedContext, outcome: NodeOutcome | None,
                      run_id: str, first_write: int = 0) -> NodeOutcome | None:
    """A failed outcome if the node's output, its awaiting details or its context writes
    (``tracked.deltas`` from ``first_write``) hold a value the store cannot hold; else None.

    Refused writes are removed from ``tracked.deltas`` (so a worker never commits them) and
    undone in ``tracked.data``. The failure is final: the node ran, so a retry or fallback
    would repeat its side effects for the same unstorable result. A node that failed on its
    own keeps its own error; only its unstorable writes are dropped.
    """
    problems: list[str] = []
    refused: dict[str, Any] = {}
    writes = tracked.deltas[first_write:]
    for operation in writes if len(writes) <= 1 else squash(writes):
        if not isinstance(operation.key, str):
            problems.append(f"node '{node.id}' wrote context key {operation.key!r} of type "
                            f"{type(operation.key).__name__}; context keys are strings")
            refused[operation.key] = operation.value
            continue
        if operation.op != "set" or _plain_scalar(operation.value):
            continue
        try:
            check_storable(operation.value, _write_name(node.id, operation.key))
        except UnstorableValueError as exc:
            problems.append(exc.message)
            refused[operation.key] = operation.value
    if outcome is not None and outcome.result is not None:
        if not _plain_scalar(outcome.result.output):
            try:
                check_storable(outcome.result.output, f"the output of node '{node.id}'")
            except UnstorableValueError as exc:
                problems.append(exc.message)
    elif outcome is not None and outcome.awaiting is not None:
        try:
            check_storable(outcome.awaiting, f"the awaiting details of node '{node.id}'")
        except UnstorableValueError as exc:
            problems.append(exc.message)
    if not problems:
        return None
    if refused:
        kept = tracked.deltas[:first_write] + [
            d for d in tracked.deltas[first_write:] if d.key not in refused
        ]
        tracked.deltas[:] = kept
        for key, value in refused.items():
            if isinstance(tracked, RunContext):
                tracked.undo(key, value)
            else:
                tracked.data.pop(key, None)
    attempts = outcome.attempts if outcome is not None else 0
    message = "; ".join(problems)
    if outcome is not None and outcome.error is not None:
        logger.warning("run %s node %s: writes refused: %s", run_id, node.id, message)
        return outcome
    return NodeOutcome(error=NodeError(node.id, message, attempts, "UnstorableValueError",
                                       run_id or None), attempts=attempts)


class NodeEngine:
    """Looks up implementations and runs single nodes; shared by every runtime and worker."""

    def __init__(self, options: RuntimeOptions, registry: Mapping[str, Any] | None = None) -> None:
        self.options = options
        self.registry: dict[str, Any] = {**BUILTIN_NODES, **options.registry, **(registry or {})}
        self._graphs: dict[str, Graph] = {}

    def blueprint(self, blueprint_id: str) -> WorkflowBlueprint:
        try:
            return self.options.blueprints[blueprint_id]
        except KeyError:
            known = ", ".join(sorted(self.options.blueprints)) or "none"
            raise UnknownBlueprintError(
                f"unknown blueprint id '{blueprint_id}' (known: {known}); register it with "
                "FlowRuntime(blueprints=...) or the worker's --blueprints directory"
            ) from None

    def graph(self, blueprint: WorkflowBlueprint) -> Graph:
        cached = self._graphs.get(blueprint.id)
        if cached is None or cached.blueprint is not blueprint:
            check_blueprint(blueprint, self.registry)
            cached = Graph(blueprint)
            self._graphs[blueprint.id] = cached
        return cached

    def fallback_for(self, graph: Graph, node: NodeDefinition) -> tuple[Any, Any]:
        name = node.config.fallback if node.config else None
        if not name:
            return None, None
        # A node id first: that node is fallback-only (never runs on its own), as the
        # reference's docs use it; otherwise a uses key.
        target = graph.nodes.get(name)
        if target is not None and target.uses in self.registry:
            return self.registry[target.uses], target.params or {}
        if name in self.registry:
            return self.registry[name], None
        return None, None

    async def run_node(
        self,
        graph: Graph,
        node: NodeDefinition,
        tracked: TrackedContext,
        node_input: Any,
        *,
        run_id: str,
        iteration: int,
        services: EngineServices,
        signal: CancellationSignal | None = None,
    ) -> NodeOutcome:
        implementation = self.registry.get(node.uses)
        if implementation is None:
            return NodeOutcome(error=NodeError(
                node.id, f"no implementation registered for uses '{node.uses}'", 0,
                "BlueprintValidationError", run_id,
            ))
        engine_writes = len(tracked.deltas)  # the delivered input: checked by routing
        fallback, fallback_params = self.fallback_for(graph, node)
        params = node.params or {}

        def make_context(attempt: int) -> NodeContext:
            # Each attempt gets its own signal: a timeout cancels that attempt only, while
            # cancelling ``signal`` (the run) reaches every attempt.
            return NodeContext(
                context=tracked, input=node_input, params=params,
                dependencies=self.options.dependencies, run_id=run_id, node_id=node.id,
                blueprint_id=graph.blueprint.id, attempt=attempt, iteration=iteration,
                signal=CancellationSignal(signal), engine=services,
            )

        if self.options.middleware:
            from .middleware import run_with_middleware

            outcome = await run_with_middleware(
                self.options.middleware, tracked, node.id, run_id,
                lambda: execute_node(
                    node, implementation, make_context, fallback=fallback,
                    fallback_params=fallback_params, event_bus=self.options.event_bus,
                    run_id=run_id))
        else:
            outcome = await execute_node(
                node, implementation, make_context, fallback=fallback,
                fallback_params=fallback_params, event_bus=self.options.event_bus,
                run_id=run_id,
            )
        result = outcome.result
        if (result is not None and len(tracked.deltas) == engine_writes
                and type(result.output) in _PLAIN_SCALARS):
            return outcome  # the common case, decided without a call
        return refuse_unstorable(node, tracked, outcome, run_id, engine_writes) or outcome
