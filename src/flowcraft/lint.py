"""``lint_blueprint``: what would go wrong with a blueprint, found before anything runs.

Validation (:class:`~flowcraft.blueprint.WorkflowBlueprint`) refuses blueprints that
cannot be run at all and stops there; the linter reports, in one list, everything a
reviewer would want to know about a blueprint and the registry it will run with. Each
:class:`LintIssue` has a stable ``code`` (the TypeScript library's ``lintBlueprint``
codes, plus a few of ours), a message, and the node or edge it concerns:

==================================  ==========================================================
``MISSING_NODE_IMPLEMENTATION``     a node's ``uses`` is not in the registry (nor built in)
``MISSING_FALLBACK_IMPLEMENTATION`` a ``config.fallback`` names neither a registry key nor a
                                    node with an implementation
``INVALID_BATCH_WORKER_KEY``        a ``batch-scatter`` ``workerUsesKey`` nothing implements
``INVALID_SUBFLOW_BLUEPRINT_ID``    a ``subflow`` names no ``blueprintId``, or (when the known
                                    blueprints are given) one that is not among them
``INVALID_EDGE_SOURCE`` /           an edge from / to a node id that does not exist
``INVALID_EDGE_TARGET``
``ORPHAN_NODE``                     a node no path from a start node reaches
``LOOP_WITHOUT_CONTINUE``           a ``loop-controller`` without a ``continue`` edge
``INVALID_BLUEPRINT``               any other validation problem (duplicate or empty ids,
                                    bad config values, ...)
==================================  ==========================================================

A blueprint given as a JSON-shaped mapping is linted even when validation would refuse
it, so edges to unknown nodes are reported as issues rather than raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .analysis import (
    fallback_only_node_ids,
    loop_problems,
    loops_without_continue,
    start_node_ids,
)
from .blueprint import (
    BlueprintMetadata,
    EdgeDefinition,
    NodeDefinition,
    WorkflowBlueprint,
    graph_problems,
)
from .errors import BlueprintValidationError
from .nodes.builtins import BUILTIN_NODES

__all__ = ["REGISTRY_CODES", "LintIssue", "lint_blueprint"]

REGISTRY_CODES = frozenset({
    "MISSING_NODE_IMPLEMENTATION", "MISSING_FALLBACK_IMPLEMENTATION", "INVALID_BATCH_WORKER_KEY",
})
"""Codes that only mean something when the registry the blueprint runs with is given."""


@dataclass(frozen=True, slots=True)
class LintIssue:
    """One finding: a stable ``code``, a message, and the node or edge it concerns."""

    code: str
    message: str
    node_id: str | None = None
    edge_index: int | None = None
    """Index into ``blueprint.edges`` for issues about an edge."""

    def to_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.node_id is not None:
            found["nodeId"] = self.node_id
        if self.edge_index is not None:
            found["edgeIndex"] = self.edge_index
        return found


def lint_blueprint(
    blueprint: WorkflowBlueprint | Mapping[str, Any],
    registry: Mapping[str, Any],
    blueprints: Mapping[str, Any] | None = None,
) -> list[LintIssue]:
    """Every issue of ``blueprint`` when run with ``registry`` (built-in ``uses`` keys are
    always known). Pass ``blueprints`` (ids or a mapping by id) to check subflow ids."""
    bp = _lenient(blueprint)
    known = {**BUILTIN_NODES, **registry}
    nodes = {node.id: node for node in bp.nodes}
    issues: list[LintIssue] = []
    for node in bp.nodes:
        issues.extend(_node_issues(node, nodes, known, blueprints))
    for index, edge in enumerate(bp.edges):
        if edge.source not in nodes:
            issues.append(LintIssue(
                "INVALID_EDGE_SOURCE",
                f"edge #{index} ({edge.source} -> {edge.target}): source '{edge.source}' "
                "is not a node of the blueprint",
                edge_index=index))
        if edge.target not in nodes:
            issues.append(LintIssue(
                "INVALID_EDGE_TARGET",
                f"edge #{index} ({edge.source} -> {edge.target}): target '{edge.target}' "
                "is not a node of the blueprint",
                edge_index=index))
    valid = _with_valid_edges(bp, nodes)
    issues.extend(
        LintIssue("LOOP_WITHOUT_CONTINUE", problem, node_id=node_id)
        for node_id, problem in zip(loops_without_continue(valid), loop_problems(valid),
                                    strict=True)
    )
    issues.extend(_orphans(valid))
    issues.extend(LintIssue("INVALID_BLUEPRINT", problem) for problem in graph_problems(valid))
    return issues


def _node_issues(node: NodeDefinition, nodes: Mapping[str, NodeDefinition],
                 known: Mapping[str, Any], blueprints: Mapping[str, Any] | None
                 ) -> list[LintIssue]:
    issues: list[LintIssue] = []
    if node.uses not in known:
        issues.append(LintIssue(
            "MISSING_NODE_IMPLEMENTATION",
            f"node '{node.id}': no implementation registered for uses '{node.uses}'",
            node_id=node.id))
    fallback = node.config.fallback if node.config else None
    if fallback and fallback not in known and (
        fallback not in nodes or nodes[fallback].uses not in known
    ):
        issues.append(LintIssue(
            "MISSING_FALLBACK_IMPLEMENTATION",
            f"node '{node.id}': fallback '{fallback}' is neither a registered uses key nor a "
            "node with a registered implementation",
            node_id=node.id))
    params = node.params or {}
    if node.uses == "batch-scatter":
        worker = params.get("workerUsesKey")
        if not worker or worker not in known:
            issues.append(LintIssue(
                "INVALID_BATCH_WORKER_KEY",
                f"node '{node.id}': " + (
                    f"no implementation registered for workerUsesKey '{worker}'" if worker
                    else "batch-scatter needs a 'workerUsesKey' parameter"),
                node_id=node.id))
    if node.uses == "subflow":
        child = params.get("blueprintId")
        if not child:
            issues.append(LintIssue(
                "INVALID_SUBFLOW_BLUEPRINT_ID",
                f"node '{node.id}': subflow needs a 'blueprintId' parameter", node_id=node.id))
        elif blueprints is not None and child not in blueprints:
            issues.append(LintIssue(
                "INVALID_SUBFLOW_BLUEPRINT_ID",
                f"node '{node.id}': subflow blueprint '{child}' is not among the known "
                f"blueprints ({', '.join(sorted(blueprints)) or 'none'})",
                node_id=node.id))
    return issues


def _orphans(bp: WorkflowBlueprint) -> list[LintIssue]:
    """Nodes no start node reaches (fallback-only nodes run in another's place: not orphans)."""
    if len(bp.nodes) < 2:
        return []
    outgoing: dict[str, list[str]] = {node.id: [] for node in bp.nodes}
    for edge in bp.edges:
        outgoing[edge.source].append(edge.target)
    reached: set[str] = set()
    stack = list(start_node_ids(bp))
    while stack:
        node_id = stack.pop()
        if node_id not in reached:
            reached.add(node_id)
            stack.extend(outgoing.get(node_id, ()))
    spared = fallback_only_node_ids(bp)
    return [
        LintIssue("ORPHAN_NODE", f"node '{node.id}' is not reachable from any start node",
                  node_id=node.id)
        for node in bp.nodes if node.id not in reached and node.id not in spared
    ]


def _with_valid_edges(bp: WorkflowBlueprint, nodes: Mapping[str, NodeDefinition]
                      ) -> WorkflowBlueprint:
    edges = [e for e in bp.edges if e.source in nodes and e.target in nodes]
    if len(edges) == len(bp.edges):
        return bp
    return WorkflowBlueprint.model_construct(id=bp.id, nodes=bp.nodes, edges=edges,
                                             metadata=bp.metadata)


def _lenient(blueprint: WorkflowBlueprint | Mapping[str, Any]) -> WorkflowBlueprint:
    """The blueprint, even one whose graph validation fails (its items must still parse)."""
    if isinstance(blueprint, WorkflowBlueprint):
        return blueprint
    try:
        return WorkflowBlueprint.model_validate(blueprint)
    except BlueprintValidationError as refused:
        try:
            nodes = [NodeDefinition.model_validate(n) for n in blueprint.get("nodes") or ()]
            edges = [EdgeDefinition.model_validate(e) for e in blueprint.get("edges") or ()]
            metadata = blueprint.get("metadata")
            return WorkflowBlueprint.model_construct(
                id=str(blueprint.get("id") or ""), nodes=nodes, edges=edges,
                metadata=BlueprintMetadata.model_validate(metadata) if metadata else None)
        except (ValidationError, TypeError, AttributeError):
            raise refused from None
