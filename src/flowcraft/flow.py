"""The fluent builder: write a blueprint in Python and collect the functions it uses.

::

    flow = (
        Flow("order")
        .node("fetch", fetch_order)
        .node("charge", charge, max_retries=3, retry_delay=200)
        .edge("fetch", "charge", condition="result.output.total > 0")
    )
    runtime = FlowRuntime(registry=flow.registry())
    await runtime.run(flow.to_blueprint(), {"orderId": 7})

Functions and ``BaseNode`` classes are registered under ``"<flow id>.<node id>"``;
a string names an existing ``uses`` key instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .blueprint import EdgeDefinition, NodeConfig, NodeDefinition, WorkflowBlueprint
from .errors import FlowcraftError
from .nodes.builtins import chunk_size_of


class Flow:
    def __init__(self, flow_id: str, *, version: str | None = None) -> None:
        self.id = flow_id
        self.version = version
        self._nodes: list[dict[str, Any]] = []
        self._edges: list[dict[str, Any]] = []
        self._registry: dict[str, Any] = {}
        self._loops: list[dict[str, Any]] = []
        self._batches: list[dict[str, str]] = []
        self._cycle_entry_points: list[str] = []

    # -- nodes ---------------------------------------------------------------------------

    def node(
        self,
        node_id: str,
        implementation: Any,
        *,
        params: dict[str, Any] | None = None,
        inputs: str | dict[str, str] | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        retry_backoff: str | None = None,
        timeout: float | None = None,
        fallback: Any = None,
        join_strategy: str | None = None,
        retry_on: Sequence[str | type[BaseException]] | None = None,
        retry_max_delay: float | None = None,
    ) -> Flow:
        """Add a node. ``implementation`` is a function, a ``BaseNode`` class or a ``uses`` key.

        ``retry_on`` lists the exception types (classes or their names) worth another
        attempt; ``retry_max_delay`` caps the wait between attempts, in milliseconds."""
        uses = self._register(node_id, implementation)
        fallback_key = None
        if fallback is not None:
            fallback_key = self._register(f"{node_id}.fallback", fallback)
        retry_on_names = None if retry_on is None else [
            kind if isinstance(kind, str) else kind.__name__ for kind in retry_on
        ]
        config = {
            "maxRetries": max_retries, "retryDelay": retry_delay, "retryBackoff": retry_backoff,
            "timeout": timeout, "fallback": fallback_key, "joinStrategy": join_strategy,
            "retryOn": retry_on_names, "retryMaxDelay": retry_max_delay,
        }
        self._add_node(node_id, uses, params=params, inputs=inputs, config=config)
        return self

    def edge(
        self,
        source: str,
        target: str,
        *,
        action: str | None = None,
        condition: str | None = None,
        transform: str | None = None,
    ) -> Flow:
        edge = {"source": source, "target": target, "action": action, "condition": condition,
                "transform": transform}
        self._edges.append({k: v for k, v in edge.items() if v is not None})
        return self

    def sleep(self, node_id: str, duration: int | float | str) -> Flow:
        self._add_node(node_id, "sleep", params={"duration": duration})
        return self

    def wait(self, node_id: str, **params: Any) -> Flow:
        self._add_node(node_id, "wait", params=params or None)
        return self

    def subflow(
        self,
        node_id: str,
        blueprint_id: str,
        *,
        inputs: dict[str, str] | None = None,
        outputs: dict[str, str] | None = None,
    ) -> Flow:
        params: dict[str, Any] = {"blueprintId": blueprint_id}
        if inputs:
            params["inputs"] = inputs
        if outputs:
            params["outputs"] = outputs
        self._add_node(node_id, "subflow", params=params)
        return self

    def batch(self, batch_id: str, worker: Any, *, input_key: str, output_key: str,
              chunk_size: int | None = None) -> Flow:
        """Fan out ``worker`` over the list at ``input_key``; the results, in order, land in
        ``output_key``. Edges to and from ``batch_id`` attach to the scatter and gather nodes.
        ``chunk_size`` sends the workers out in waves of at most that many, each wave once
        the previous one has finished (the scatter's ``chunkSize``)."""
        scatter_id, gather_id = f"{batch_id}_scatter", f"{batch_id}_gather"
        chunk = chunk_size_of(chunk_size, scatter_id)
        worker_uses = self._register(f"{batch_id}_worker", worker)
        params: dict[str, Any] = {
            "workerUsesKey": worker_uses, "outputKey": output_key, "gatherNodeId": gather_id,
        }
        if chunk is not None:
            params["chunkSize"] = chunk
        self._add_node(scatter_id, "batch-scatter", inputs=input_key, params=params)
        self._add_node(gather_id, "batch-gather", params={
            "outputKey": output_key, "gatherNodeId": gather_id,
        }, config={"joinStrategy": "all"})
        self.edge(scatter_id, gather_id)
        self._batches.append({"id": batch_id, "scatter": scatter_id, "gather": gather_id})
        return self

    def loop(
        self,
        loop_id: str,
        *,
        start_node_id: str,
        end_node_id: str,
        condition: str,
        max_iterations: int | None = None,
    ) -> Flow:
        """Repeat ``start_node_id`` … ``end_node_id`` while ``condition`` holds. Edges you add
        from ``loop_id`` leave the loop (they get the ``break`` action)."""
        params: dict[str, Any] = {"condition": condition}
        if max_iterations is not None:
            params["maxIterations"] = max_iterations
        self._add_node(loop_id, "loop-controller", params=params)
        self._loops.append({"id": loop_id, "start": start_node_id, "end": end_node_id})
        self.edge(end_node_id, loop_id)
        self.edge(loop_id, start_node_id, action="continue")
        return self

    def set_cycle_entry_point(self, node_id: str) -> Flow:
        self._cycle_entry_points.append(node_id)
        return self

    # -- output --------------------------------------------------------------------------

    def registry(self) -> dict[str, Any]:
        """The functions and classes this flow registered, keyed by their ``uses`` key."""
        return dict(self._registry)

    def to_blueprint(self) -> WorkflowBlueprint:
        if not self._nodes:
            raise FlowcraftError(f"flow '{self.id}' has no nodes")
        edges = [dict(edge) for edge in self._edges]
        for loop in self._loops:
            for edge in edges:
                if edge["source"] == loop["id"] and edge["target"] != loop["start"]:
                    edge.setdefault("action", "break")
        for batch in self._batches:
            for edge in edges:
                if edge["target"] == batch["id"]:
                    edge["target"] = batch["scatter"]
                if edge["source"] == batch["id"]:
                    edge["source"] = batch["gather"]
        metadata: dict[str, Any] = {}
        if self.version:
            metadata["version"] = self.version
        if self._cycle_entry_points:
            metadata["cycleEntryPoints"] = self._cycle_entry_points
        return WorkflowBlueprint.model_validate({
            "id": self.id,
            "nodes": self._nodes,
            "edges": [EdgeDefinition.model_validate(e).to_dict() for e in edges],
            **({"metadata": metadata} if metadata else {}),
        })

    # -- helpers -------------------------------------------------------------------------

    def _register(self, name: str, implementation: Any) -> str:
        if isinstance(implementation, str):
            return implementation
        if not callable(implementation):
            raise FlowcraftError(
                f"flow '{self.id}': node '{name}' needs a function, a BaseNode class or a "
                f"uses key, not {type(implementation).__name__}"
            )
        key = f"{self.id}.{name}"
        self._registry[key] = implementation
        return key

    def _add_node(
        self,
        node_id: str,
        uses: str,
        *,
        params: dict[str, Any] | None = None,
        inputs: str | dict[str, str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        raw: dict[str, Any] = {"id": node_id, "uses": uses}
        if params:
            raw["params"] = params
        if inputs is not None:
            raw["inputs"] = inputs
        config = {k: v for k, v in (config or {}).items() if v is not None}
        if config:
            raw["config"] = NodeConfig.model_validate(config).to_dict()
        self._nodes.append(NodeDefinition.model_validate(raw).to_dict())
