"""Static analysis of blueprints: start and terminal nodes, cycles, Mermaid diagrams.

Start nodes are the nodes without incoming edges, except nodes that exist
only to be another node's ``fallback``. A graph where every node has an
incoming edge (a pure cycle) starts at ``metadata.cycleEntryPoints`` or, if
none are given, at the first node of each cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .blueprint import WorkflowBlueprint


@dataclass(frozen=True)
class BlueprintAnalysis:
    start_node_ids: list[str]
    terminal_node_ids: list[str]
    cycles: list[list[str]] = field(default_factory=list)
    node_count: int = 0
    edge_count: int = 0

    @property
    def is_dag(self) -> bool:
        return not self.cycles

    def to_dict(self) -> dict[str, object]:
        return {
            "startNodeIds": self.start_node_ids,
            "terminalNodeIds": self.terminal_node_ids,
            "cycles": self.cycles,
            "isDag": self.is_dag,
            "nodeCount": self.node_count,
            "edgeCount": self.edge_count,
        }


def find_cycles(blueprint: WorkflowBlueprint) -> list[list[str]]:
    """Each cycle as a path of node ids that ends where it starts (``[a, b, a]``).

    Iterative DFS, so deep graphs cannot overflow the stack.
    """
    adjacency: dict[str, list[str]] = {node.id: [] for node in blueprint.nodes}
    for edge in blueprint.edges:
        if edge.source in adjacency and edge.target in adjacency:
            adjacency[edge.source].append(edge.target)
    unvisited, on_path, finished = 0, 1, 2
    state = dict.fromkeys(adjacency, unvisited)
    cycles: list[list[str]] = []
    for root in adjacency:
        if state[root] != unvisited:
            continue
        path: list[str] = [root]
        position: dict[str, int] = {root: 0}
        iterators = [iter(adjacency[root])]
        state[root] = on_path
        while iterators:
            successor = next(iterators[-1], None)
            if successor is None:
                iterators.pop()
                done = path.pop()
                del position[done]
                state[done] = finished
                continue
            if state[successor] == on_path:
                cycles.append([*path[position[successor] :], successor])
            elif state[successor] == unvisited:
                state[successor] = on_path
                position[successor] = len(path)
                path.append(successor)
                iterators.append(iter(adjacency[successor]))
    return cycles


def fallback_only_node_ids(blueprint: WorkflowBlueprint) -> set[str]:
    """Nodes named as another node's fallback that no edge leads to."""
    targets = {edge.target for edge in blueprint.edges}
    node_ids = {node.id for node in blueprint.nodes}
    named = {
        node.config.fallback
        for node in blueprint.nodes
        if node.config and node.config.fallback in node_ids
    }
    return {node_id for node_id in named if node_id not in targets and node_id is not None}


def start_node_ids(
    blueprint: WorkflowBlueprint, cycles: list[list[str]] | None = None
) -> list[str]:
    targets = {edge.target for edge in blueprint.edges}
    excluded = fallback_only_node_ids(blueprint)
    starts = [n.id for n in blueprint.nodes if n.id not in targets and n.id not in excluded]
    if starts or not blueprint.nodes:
        return starts
    entry_points = blueprint.metadata.cycle_entry_points if blueprint.metadata else None
    if entry_points:
        return list(dict.fromkeys(entry_points))
    found = cycles if cycles is not None else find_cycles(blueprint)
    return list(dict.fromkeys(cycle[0] for cycle in found))


def terminal_node_ids(blueprint: WorkflowBlueprint) -> list[str]:
    sources = {edge.source for edge in blueprint.edges}
    excluded = fallback_only_node_ids(blueprint)
    return [n.id for n in blueprint.nodes if n.id not in sources and n.id not in excluded]


def loops_without_continue(blueprint: WorkflowBlueprint) -> list[str]:
    """``loop-controller`` nodes that cannot loop: without a ``continue`` edge, their body
    would never run again (the TypeScript library refuses such a blueprint too)."""
    continuing = {edge.source for edge in blueprint.edges if edge.action == "continue"}
    return [
        node.id for node in blueprint.nodes
        if node.uses == "loop-controller" and node.id not in continuing
    ]


def loop_problems(blueprint: WorkflowBlueprint) -> list[str]:
    return [
        f"node '{node_id}': loop-controller has no edge with action 'continue' back into its "
        "loop body; add one (Flow.loop(...) wires it), or use another node type"
        for node_id in loops_without_continue(blueprint)
    ]


def analyze_blueprint(blueprint: WorkflowBlueprint) -> BlueprintAnalysis:
    cycles = find_cycles(blueprint)
    return BlueprintAnalysis(
        start_node_ids=start_node_ids(blueprint, cycles),
        terminal_node_ids=terminal_node_ids(blueprint),
        cycles=cycles,
        node_count=len(blueprint.nodes),
        edge_count=len(blueprint.edges),
    )


def generate_mermaid(blueprint: WorkflowBlueprint) -> str:
    """A Mermaid ``flowchart TD`` of the blueprint; edges show action, condition, transform."""
    if not blueprint.nodes:
        return "flowchart TD\n    empty[Empty Blueprint]\n"
    ids = {node.id: f"n{index}" for index, node in enumerate(blueprint.nodes)}
    lines = ["flowchart TD"]
    for node in blueprint.nodes:
        label = f"{node.id}<br/>{node.uses}"
        if node.params:
            label += f"<br/>params: {json.dumps(node.params, sort_keys=True)}"
        lines.append(f'    {ids[node.id]}["{_escape(label)}"]')
    for edge in blueprint.edges:
        parts = [part for part in (edge.action, edge.condition, edge.transform) if part]
        arrow = f'-- "{_escape(" | ".join(parts))}" -->' if parts else "-->"
        lines.append(f"    {ids[edge.source]} {arrow} {ids[edge.target]}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    # Mermaid labels are quoted; a raw double quote would end the label.
    return text.replace('"', "#quot;")
