"""Blueprints: the declarative definition of a workflow graph.

The JSON shape is the one the TypeScript library writes (camelCase keys), so a
blueprint file is shared unchanged between TypeScript and Python services::

    {"id": "greet", "nodes": [{"id": "hello", "uses": "say", "params": {"to": "you"}}],
     "edges": [{"source": "hello", "target": "done", "action": "ok"}]}

Python code uses snake_case attributes (``node.config.max_retries``); ``to_dict``
writes camelCase back with unset fields omitted.

Validation reports *every* problem at once, each naming the node or edge it
concerns, and raises :class:`~flowcraft.errors.BlueprintValidationError`
(which is also a ``ValueError``). Problems that depend on the registry (an
unknown ``uses``, a ``fallback`` nobody provides) and expressions (edge
conditions and transforms, loop conditions) are checked by
:func:`check_blueprint` when a run starts or a worker first loads the
blueprint, before any node runs. Expressions are not checked at load time, so a
blueprint written for the TypeScript library whose expressions only it can read
still loads, analyses and draws.

Blueprint objects are never mutated by the runtime.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .errors import BlueprintValidationError, ExpressionError
from .expressions import compile_expression

JoinStrategy = Literal["all", "any"]
_ModelT = TypeVar("_ModelT", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        frozen=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready camelCase form, unset and ``None`` fields omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class NodeConfig(_Model):
    """Per-node execution settings."""

    max_retries: int | None = None
    """Total number of attempts (1 = no retry)."""
    retry_delay: float | None = None
    """Milliseconds between attempts."""
    retry_backoff: Literal["fixed", "exponential"] | None = None
    """``exponential`` doubles the delay per attempt and adds up to 20% jitter."""
    retry_max_delay: float | None = None
    """Milliseconds: the longest wait between attempts (caps exponential backoff)."""
    retry_on: list[str] | None = None
    """Names of the exception types worth another attempt (a name matches subclasses too);
    any other error fails the node at once. Unset: every error is retried, except
    :class:`~flowcraft.errors.NonRetryableError`, which never is."""
    timeout: float | None = None
    """Milliseconds one attempt may run before it is cancelled."""
    fallback: str | None = None
    """A registry key (or the id of a node whose ``uses`` is taken) run after the last failure."""
    join_strategy: str | None = None
    """``all`` (default): wait for every predecessor that can still arrive; ``any``: the first."""


class NodeDefinition(_Model):
    id: str
    uses: str
    params: dict[str, Any] | None = None
    inputs: str | dict[str, str] | None = None
    config: NodeConfig | None = None

    @model_validator(mode="after")
    def _share(self) -> NodeDefinition:
        return _shared_fields(self)

    @property
    def join_strategy(self) -> str:
        return (self.config.join_strategy if self.config else None) or "all"


class EdgeDefinition(_Model):
    source: str
    target: str
    action: str | None = None
    condition: str | None = None
    transform: str | None = None

    @model_validator(mode="after")
    def _share(self) -> EdgeDefinition:
        return _shared_fields(self)


class BlueprintMetadata(_Model):
    version: str | None = None
    cycle_entry_points: list[str] | None = None


class WorkflowBlueprint(_Model):
    id: str
    nodes: list[NodeDefinition] = Field(default_factory=list)
    edges: list[EdgeDefinition] = Field(default_factory=list)
    metadata: BlueprintMetadata | None = None

    @model_validator(mode="after")
    def _check_graph(self) -> WorkflowBlueprint:
        problems = graph_problems(self)
        if problems:
            raise BlueprintValidationError(self.id or None, problems)
        _share_repeats(self)
        return self

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> WorkflowBlueprint:
        if isinstance(obj, WorkflowBlueprint):
            return obj
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise _as_blueprint_error(obj, exc) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkflowBlueprint:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BlueprintValidationError(None, [f"not valid JSON: {exc}"]) from None
        return cls.model_validate(data)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    # -- lookups -----------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return self.metadata.version if self.metadata else None

    def node(self, node_id: str) -> NodeDefinition:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)


def load_blueprint(path: str | PathLike[str]) -> WorkflowBlueprint:
    """Read a blueprint JSON file (as written for the TypeScript library).

    A file without an ``id`` is named by its file name's stem (``201.json`` is blueprint
    ``201``), as the TypeScript library's example files expect; an explicit ``id`` wins.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlueprintValidationError(None, [f"cannot read {file}: {exc.strerror}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BlueprintValidationError(file.name, [f"not valid JSON: {exc}"]) from None
    named_by_file = isinstance(data, dict) and data.get("id") is None
    if named_by_file:
        data = {**data, "id": file.stem}
    try:
        return WorkflowBlueprint.model_validate(data)
    except BlueprintValidationError as exc:
        name = file.name if named_by_file else exc.blueprint_id or file.name
        raise BlueprintValidationError(name, exc.problems) from None


def load_blueprints(directory: str | PathLike[str]) -> dict[str, WorkflowBlueprint]:
    """Every ``*.json`` blueprint in a directory, keyed by blueprint id (the file name's stem
    for a file without an ``id``). Two files with the same id are an error naming both."""
    folder = Path(directory)
    if not folder.is_dir():
        raise BlueprintValidationError(None, [
            f"{folder} is not a directory; pass the directory that holds the blueprint files"])
    result: dict[str, WorkflowBlueprint] = {}
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.json")):
        blueprint = load_blueprint(file)
        if blueprint.id in files:
            raise BlueprintValidationError(blueprint.id, [
                f"blueprint id '{blueprint.id}' is defined twice: in {files[blueprint.id]} "
                f"and in {file}; give one of them another \"id\" (or file name)"
            ])
        files[blueprint.id] = file
        result[blueprint.id] = blueprint
    return result


# -- validation --------------------------------------------------------------------------


def graph_problems(blueprint: WorkflowBlueprint) -> list[str]:
    """Structural problems that need no registry: ids, edges, config values."""
    problems: list[str] = []
    if not blueprint.id:
        problems.append("blueprint id is empty")
    seen: set[str] = set()
    for index, node in enumerate(blueprint.nodes):
        where = f"node '{node.id}'" if node.id else f"node #{index}"
        if not node.id:
            problems.append(f"{where}: id is empty")
        elif node.id in seen:
            problems.append(f"{where}: duplicate node id")
        seen.add(node.id)
        if not node.uses:
            problems.append(f"{where}: 'uses' is empty")
        problems.extend(f"{where}: {p}" for p in _config_problems(node.config))
    for index, edge in enumerate(blueprint.edges):
        where = f"edge #{index} ({edge.source} -> {edge.target})"
        if edge.source not in seen:
            problems.append(f"{where}: source '{edge.source}' is not a node")
        if edge.target not in seen:
            problems.append(f"{where}: target '{edge.target}' is not a node")
    if blueprint.metadata and blueprint.metadata.cycle_entry_points:
        for entry in blueprint.metadata.cycle_entry_points:
            if entry not in seen:
                problems.append(f"metadata.cycleEntryPoints: '{entry}' is not a node")
    return problems


# The sets of fields nodes and edges are given: pydantic keeps one per model, a blueprint of
# 100,000 nodes repeats a handful of them. A copy of a model copies its set, and frozen
# models never change theirs, so models may share one.
_FIELD_SETS: dict[frozenset[str], set[str]] = {}


def _shared_fields(model: _ModelT) -> _ModelT:
    given = model.__pydantic_fields_set__
    shared = _FIELD_SETS.get(frozenset(given))
    if shared is None:
        if len(_FIELD_SETS) < 256:
            _FIELD_SETS[frozenset(given)] = given
    elif shared is not given:
        object.__setattr__(model, "__pydantic_fields_set__", shared)
    return model


def _share_repeats(blueprint: WorkflowBlueprint) -> None:
    """Keep each node id once: the edges name the nodes' own id strings. With the shared
    field sets, a 100,000-node blueprint is about 60 MB smaller; nothing a caller can see
    changes."""
    ids = {node.id: node.id for node in blueprint.nodes}
    for edge in blueprint.edges:
        fields = edge.__dict__
        fields["source"] = ids.get(edge.source, edge.source)
        fields["target"] = ids.get(edge.target, edge.target)


def _config_problems(config: NodeConfig | None) -> Iterable[str]:
    if config is None:
        return
    if config.join_strategy is not None and config.join_strategy not in ("all", "any"):
        yield f"joinStrategy must be 'all' or 'any', not '{config.join_strategy}'"
    if config.max_retries is not None and config.max_retries < 1:
        yield (
            "maxRetries is the total number of attempts and must be >= 1, "
            f"not {config.max_retries}"
        )
    if config.retry_delay is not None and config.retry_delay < 0:
        yield f"retryDelay must be >= 0 ms, not {config.retry_delay}"
    if config.retry_max_delay is not None and config.retry_max_delay < 0:
        yield f"retryMaxDelay must be >= 0 ms, not {config.retry_max_delay}"
    if config.retry_on is not None and not all(name.strip() for name in config.retry_on):
        yield "retryOn holds an empty exception type name"
    if config.timeout is not None and config.timeout <= 0:
        yield f"timeout must be > 0 ms, not {config.timeout}"
    if config.fallback is not None and not config.fallback:
        yield "fallback is empty"


def check_blueprint(blueprint: WorkflowBlueprint,
                    known_uses: Mapping[str, Any] | None = None) -> None:
    """Everything loading cannot check, at once: every expression compiles and, given the
    registry's ``known_uses``, every ``uses`` and ``fallback`` has an implementation.

    Runtimes and workers call it (through ``NodeEngine.graph``) before any node of the
    blueprint runs; raises :class:`~flowcraft.errors.BlueprintValidationError` listing
    every problem, each naming its node or edge.
    """
    problems = expression_problems(blueprint)
    if known_uses is not None:
        problems = registry_problems(blueprint, known_uses) + problems
    if problems:
        raise BlueprintValidationError(blueprint.id, problems)


def expression_problems(blueprint: WorkflowBlueprint) -> list[str]:
    """Edge conditions and transforms, and loop-controller conditions, that do not compile."""
    problems: list[str] = []
    for index, edge in enumerate(blueprint.edges):
        if not (edge.condition or edge.transform):
            continue  # most edges: an empty expression is no expression, as when running
        for field, source in (("condition", edge.condition), ("transform", edge.transform)):
            if not source:
                continue
            try:
                compile_expression(source)
            except ExpressionError as exc:
                where = f"edge #{index} ({edge.source} -> {edge.target})"
                problems.append(f"{where}: {field}: {exc.message}")
    for node in blueprint.nodes:
        if node.uses != "loop-controller":
            continue
        condition = (node.params or {}).get("condition")
        if not condition:
            problems.append(f"node '{node.id}': loop-controller needs a 'condition' parameter")
            continue
        try:
            compile_expression(condition)
        except ExpressionError as exc:
            problems.append(f"node '{node.id}': condition: {exc.message}")
    return problems


def check_registry(blueprint: WorkflowBlueprint, known_uses: Mapping[str, Any]) -> None:
    """Fail before any node runs if a ``uses`` or ``fallback`` has no implementation."""
    problems = registry_problems(blueprint, known_uses)
    if problems:
        raise BlueprintValidationError(blueprint.id, problems)


def registry_problems(blueprint: WorkflowBlueprint, known_uses: Mapping[str, Any]) -> list[str]:
    """Nodes whose ``uses``, ``fallback`` or batch ``workerUsesKey`` has no implementation."""
    problems: list[str] = []
    node_ids = {node.id: node for node in blueprint.nodes}
    for node in blueprint.nodes:
        if node.uses not in known_uses:
            problems.append(
                f"node '{node.id}': no implementation registered for uses '{node.uses}'"
            )
        fallback = node.config.fallback if node.config else None
        if fallback and fallback not in known_uses:
            target = node_ids.get(fallback)
            if target is None or target.uses not in known_uses:
                problems.append(
                    f"node '{node.id}': fallback '{fallback}' is neither a registered uses key "
                    "nor a node with a registered implementation"
                )
        worker = (node.params or {}).get("workerUsesKey") if node.uses == "batch-scatter" else None
        if worker is not None and worker not in known_uses:
            # Batch workers are added while running; their uses is known now.
            problems.append(
                f"node '{node.id}': no implementation registered for workerUsesKey '{worker}'"
            )
    return problems


def _as_blueprint_error(obj: Any, exc: ValidationError) -> BlueprintValidationError:
    blueprint_id = obj.get("id") if isinstance(obj, Mapping) else None
    problems: list[str] = []
    graph_checked = False
    for error in exc.errors():
        inner = error.get("ctx", {}).get("error")
        if isinstance(inner, BlueprintValidationError):
            problems.extend(inner.problems)
            graph_checked = True
            continue
        problems.append(f"{_describe_location(obj, error['loc'])}: {error['msg']}")
    if not graph_checked and isinstance(obj, Mapping):
        # pydantic stops before the graph check when a field is invalid; report both at once.
        problems.extend(p for p in _lenient_graph_problems(obj) if p not in problems)
    return BlueprintValidationError(
        blueprint_id if isinstance(blueprint_id, str) else None, problems
    )


def _lenient_graph_problems(obj: Mapping[str, Any]) -> list[str]:
    """The graph problems of a blueprint whose fields did not all validate. An item that
    fails keeps its id and its valid config values (its field errors are reported already)."""

    def valid(model: type[_Model], raw: Any) -> Any:
        try:
            return model.model_validate(raw)
        except ValidationError:
            return None

    def items(key: str) -> list[Mapping[str, Any]]:
        raw = obj.get(key)
        return [item for item in raw if isinstance(item, Mapping)] if isinstance(raw, list) else []

    def lenient_config(raw: Any) -> NodeConfig | None:
        if not isinstance(raw, Mapping):
            return None
        fields = {k: v for k, v in raw.items() if valid(NodeConfig, {k: v}) is not None}
        return NodeConfig.model_validate(fields)

    nodes = [
        valid(NodeDefinition, raw) or NodeDefinition.model_construct(
            id=raw["id"], uses="?", config=lenient_config(raw.get("config")))
        for raw in items("nodes") if isinstance(raw.get("id"), str)
    ]
    edges = [
        valid(EdgeDefinition, raw) or EdgeDefinition.model_construct(
            source=raw["source"], target=raw["target"])
        for raw in items("edges")
        if isinstance(raw.get("source"), str) and isinstance(raw.get("target"), str)
    ]
    blueprint_id = obj.get("id")
    return graph_problems(WorkflowBlueprint.model_construct(
        id=blueprint_id if isinstance(blueprint_id, str) else "?", nodes=nodes, edges=edges,
        metadata=valid(BlueprintMetadata, obj.get("metadata")),
    ))


def _describe_location(obj: Any, loc: tuple[Any, ...]) -> str:
    """Turn pydantic's ('nodes', 2, 'uses') into "node 'fetch' field 'uses'"."""
    if len(loc) >= 2 and loc[0] in ("nodes", "edges") and isinstance(loc[1], int):
        items = obj.get(loc[0]) if isinstance(obj, Mapping) else None
        item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
        if loc[0] == "nodes":
            node_id = item.get("id") if isinstance(item, Mapping) else None
            head = f"node '{node_id}'" if node_id else f"node #{loc[1]}"
        else:
            if isinstance(item, Mapping):
                head = f"edge #{loc[1]} ({item.get('source')} -> {item.get('target')})"
            else:
                head = f"edge #{loc[1]}"
        rest = ".".join(str(part) for part in loc[2:])
        return f"{head} field '{rest}'" if rest else head
    return ".".join(str(part) for part in loc) or "blueprint"
