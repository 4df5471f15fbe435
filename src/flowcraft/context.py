"""Run contexts: the key/value state a workflow run reads and writes.

``AsyncContext`` is the protocol every context implements (in memory,
DynamoDB, Cosmos DB, the view a node gets). Keys are flat strings; the
engine's own keys use a leading underscore (``_outputs.<nodeId>``,
``_inputs.<nodeId>``, ``_awaitingNodeIds``) exactly as the TypeScript library
names them, plus ``_flowcraft.*`` bookkeeping that records which nodes finished
and where they routed (see :mod:`flowcraft.core.routing`).

Every context implements the protocol the same way: :class:`AsyncContextBase`
writes its six methods once over two primitives, ``load()`` (the whole context)
and ``apply(operations)`` (an ordered patch). A backend supplies those two as
one read and one write of its item; :class:`InMemoryContext` over a dict;
:class:`TrackedContext` by recording each write.

Nodes never talk to a backend directly. They get a :class:`TrackedContext`: a
view over a plain ``dict`` that records every write as a
:class:`PatchOperation`. The in-memory runtime hands every node a view over
the run's one shared dict; a distributed worker loads the stored context once
per job into a dict, lets the node work on it, and commits the recorded
operations together with the node's output in a single conditional write.
One mechanism, two backends: nodes cannot tell them apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import InvalidContextError, UnstorableValueError

INTERNAL_PREFIX = "_flowcraft."
"""Bookkeeping keys the engine keeps in a run's context; hidden from ``WorkflowResult.context``."""


@dataclass(frozen=True, slots=True)
class PatchOperation:
    """One change to a context: ``set`` a key to a value, or ``delete`` it."""

    op: Literal["set", "delete"]
    key: str
    value: Any = None

    @classmethod
    def set(cls, key: str, value: Any) -> PatchOperation:
        return cls("set", key, value)

    @classmethod
    def delete(cls, key: str) -> PatchOperation:
        return cls("delete", key)


def apply_patch(data: MutableMapping[str, Any], operations: Iterable[PatchOperation]) -> None:
    """Apply operations to a dict in order (the reference semantics for every backend)."""
    for operation in operations:
        if operation.op == "set":
            data[operation.key] = operation.value
        else:
            data.pop(operation.key, None)


def squash(operations: Iterable[PatchOperation]) -> list[PatchOperation]:
    """The last operation per key, in first-write order: what a backend needs to write."""
    last: dict[str, PatchOperation] = {}
    for operation in operations:
        last.pop(operation.key, None)
        last[operation.key] = operation
    return list(last.values())


@runtime_checkable
class AsyncContext(Protocol):
    """The state of one run. Missing keys read as ``None``."""

    async def get(self, key: str, default: Any = None) -> Any: ...
    async def set(self, key: str, value: Any) -> None: ...
    async def has(self, key: str) -> bool: ...
    async def delete(self, key: str) -> bool: ...
    async def to_dict(self) -> dict[str, Any]: ...
    async def patch(self, operations: Sequence[PatchOperation]) -> None: ...


class AsyncContextBase(ABC):
    """:class:`AsyncContext` written once over ``load()`` and ``apply()``.

    A subclass supplies the whole context as it is now (``None`` when there is none: a
    stored run not created yet) and the application of an ordered patch; every read is one
    ``load()``, every write one ``apply()``. For a stored context that is one service call
    each.
    """

    __slots__ = ()

    @abstractmethod
    async def load(self) -> Mapping[str, Any] | None:
        """The whole context, or ``None`` when there is none."""

    @abstractmethod
    async def apply(self, operations: Sequence[PatchOperation]) -> Mapping[str, Any] | None:
        """Apply ``operations`` in order; return the context after them (``None``: none)."""

    async def get(self, key: str, default: Any = None) -> Any:
        return (await self.load() or {}).get(key, default)

    async def set(self, key: str, value: Any) -> None:
        await self.apply([PatchOperation("set", key, value)])

    async def has(self, key: str) -> bool:
        return key in (await self.load() or {})

    async def delete(self, key: str) -> bool:
        existed = await self.has(key)
        if existed:
            await self.apply([PatchOperation("delete", key)])
        return existed

    async def to_dict(self) -> dict[str, Any]:
        return dict(await self.load() or {})

    async def patch(self, operations: Sequence[PatchOperation]) -> None:
        await self.apply(operations)


class InMemoryContext(AsyncContextBase):
    """A context held in a dict (for tests and tools; runs keep theirs in the engine)."""

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(initial or {})

    async def load(self) -> Mapping[str, Any]:
        """The live dict (no copy)."""
        return self._data

    async def apply(self, operations: Sequence[PatchOperation]) -> Mapping[str, Any]:
        apply_patch(self._data, operations)
        return self._data

    @property
    def data(self) -> dict[str, Any]:
        """The live dict (no copy)."""
        return self._data


_MISSING = object()


class SyncContextView:
    """Blocking access to a node's context, for plain ``def`` nodes running in a thread."""

    def __init__(self, tracked: TrackedContext) -> None:
        self._tracked = tracked

    def get(self, key: str, default: Any = None) -> Any:
        return self._tracked.get_now(key, default)

    def set(self, key: str, value: Any) -> None:
        self._tracked.set_now(key, value)

    def has(self, key: str) -> bool:
        return key in self._tracked.data

    def delete(self, key: str) -> bool:
        return self._tracked.delete_now(key)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._tracked.data)

    def __getitem__(self, key: str) -> Any:
        return self._tracked.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._tracked.set_now(key, value)

    def __contains__(self, key: object) -> bool:
        return key in self._tracked.data

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tracked.data))


class TrackedContext(AsyncContextBase):
    """The context a node sees: reads and writes a dict, and records each write.

    ``deltas`` lists the writes in order; the engine commits them with the
    node's output. The async methods are :class:`AsyncContextBase`'s; ``sync``
    offers the same operations without ``await`` for plain ``def`` nodes.
    """

    __slots__ = ("_sync", "data", "deltas")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.deltas: list[PatchOperation] = []
        self._sync: SyncContextView | None = None

    # The engine and sync nodes use these.
    def get_now(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set_now(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.deltas.append(PatchOperation("set", key, value))

    def delete_now(self, key: str) -> bool:
        existed = self.data.pop(key, _MISSING) is not _MISSING
        self.deltas.append(PatchOperation("delete", key))
        return existed

    @property
    def sync(self) -> SyncContextView:
        if self._sync is None:
            self._sync = SyncContextView(self)
        return self._sync

    # AsyncContextBase
    async def load(self) -> Mapping[str, Any]:
        """The node's working dict (no copy)."""
        return self.data

    async def apply(self, operations: Sequence[PatchOperation]) -> Mapping[str, Any]:
        for operation in operations:
            if operation.op == "set":
                self.set_now(operation.key, operation.value)
            else:
                self.delete_now(operation.key)
        return self.data

    async def delete(self, key: str) -> bool:
        # Recorded even when the key is absent: the write is the node's, and the run's
        # events show it as the node made it.
        return self.delete_now(key)


def public_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """The context without the engine's ``_flowcraft.*`` bookkeeping."""
    return {k: v for k, v in data.items() if not k.startswith(INTERNAL_PREFIX)}


def deep_copy_json(value: Any) -> Any:
    """A deep copy of a storable value (see :func:`check_storable`), so a snapshot cannot be
    changed through a node's reference to it: new dicts, lists and tuples; strings and
    numbers are shared (they cannot change). Several times faster than ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {key: deep_copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [deep_copy_json(item) for item in value]
    if isinstance(value, tuple):
        return tuple(deep_copy_json(item) for item in value)
    return value


MAX_STORABLE_DEPTH = 200
"""How deep a stored value may nest (JSON parsers and the cloud stores have limits too)."""


def check_storable(value: Any, what: str = "value") -> None:
    """Raise :class:`~flowcraft.errors.UnstorableValueError` unless ``value`` is plain JSON.

    Plain JSON: ``None``, ``bool``, ``int``, finite ``float``, ``str``, lists and tuples of
    plain JSON, and dicts with ``str`` keys and plain JSON values — what every backend
    stores and reads back unchanged. ``what`` names the value in the message
    (``"output of node 'charge'"``). One shared check, so a value is refused the same way
    in memory and on every backend, before anything is written.
    """

    ancestors: set[int] = set()  # containers on the current path: a shared value is fine

    def visit(item: Any, path: str, depth: int) -> None:
        if item is None or isinstance(item, bool | str | int):
            return
        if isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                raise UnstorableValueError(
                    f"{what} cannot be stored: {item!r} at {path} is not a JSON number; "
                    "use None or a string instead", path=path)
            return
        if not isinstance(item, dict | list | tuple):
            raise UnstorableValueError(
                f"{what} cannot be stored: {type(item).__name__} at {path} is not JSON; "
                "convert it first (str() for dates and decimals, list() for sets, base64 for "
                "bytes, model_dump() for models)", path=path)
        if depth >= MAX_STORABLE_DEPTH:
            raise UnstorableValueError(
                f"{what} cannot be stored: it nests deeper than {MAX_STORABLE_DEPTH} levels "
                f"at {path}", path=path)
        if id(item) in ancestors:
            raise UnstorableValueError(
                f"{what} cannot be stored: it contains itself at {path} (a circular "
                "reference)", path=path)
        ancestors.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise UnstorableValueError(
                        f"{what} cannot be stored: key {key!r} at {path} is of type "
                        f"{type(key).__name__}; JSON object keys are strings", path=path)
                visit(child, f"{path}.{key}", depth + 1)
        else:
            for index, child in enumerate(item):
                visit(child, f"{path}[{index}]", depth + 1)
        ancestors.discard(id(item))

    visit(value, "$", 0)


ENGINE_KEY_PREFIXES = ("_outputs.", "_inputs.", INTERNAL_PREFIX)
ENGINE_KEYS = frozenset({"_awaitingNodeIds", "_awaitingDetails"})


def is_engine_key(key: str) -> bool:
    """Whether the engine owns ``key`` (outputs, inputs, bookkeeping, the awaiting list)."""
    return key in ENGINE_KEYS or key.startswith(ENGINE_KEY_PREFIXES)


def validate_initial_context(initial: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check a run's initial context and return it as a new dict.

    Refuses, naming every offending key at once, keys the engine owns (a caller could
    otherwise plant outputs or skip nodes) and values that cannot be stored. The same check
    runs in memory and on every backend, before anything is written.
    """
    if initial is None:
        return {}
    if type(initial) is dict and not initial:
        return {}
    if not isinstance(initial, Mapping):
        raise InvalidContextError(
            f"the initial context must be a JSON object (a mapping), not "
            f"{type(initial).__name__}")
    problems = []
    for key in initial:
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string")
        elif is_engine_key(key):
            problems.append(f"key '{key}' belongs to the engine (keys starting with "
                            f"{', '.join(ENGINE_KEY_PREFIXES)} and {', '.join(sorted(ENGINE_KEYS))}"
                            " are written by flowcraft only); rename it")
    if not problems:
        try:
            check_storable(dict(initial), "the initial context")
        except UnstorableValueError as exc:
            problems.append(exc.message)
    if problems:
        raise InvalidContextError("cannot start the run: " + "; ".join(problems))
    return dict(initial)


# -- the context as expressions see it ------------------------------------------------------

OUTPUTS_PREFIX = "_outputs."
"""Where a node's output is stored: ``_outputs.<node id>``."""


class ContextNames(Mapping[str, Any]):
    """The context as expressions see it: a key, else the output of the node of that id.

    The TypeScript library also stores each node's output under its bare id, so its
    blueprints read ``route.total`` or ``context["route"]`` for node ``route``'s output.
    Outputs are stored once (``_outputs.<id>``); this view resolves the bare id instead.
    Iteration and length cover the stored keys only.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getitem__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            if isinstance(name, str) and not name.startswith("_"):
                return self._data[OUTPUTS_PREFIX + name]
            raise

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except (KeyError, TypeError):
            return default

    def __contains__(self, name: object) -> bool:
        return name in self._data or (
            isinstance(name, str) and not name.startswith("_")
            and OUTPUTS_PREFIX + name in self._data
        )

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class ExpressionNames(Mapping[str, Any]):
    """The names an expression sees: a few fixed ones (``result``, or ``input``), ``context``,
    and every identifier context key, or node id (its output) where no key has that name.

    Lazy, so evaluating an expression costs nothing per context key.
    """

    __slots__ = ("_context", "_fixed")

    def __init__(self, data: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
        self._context = ContextNames(data)
        self._fixed = {**fixed, "context": self._context}

    def __getitem__(self, name: str) -> Any:
        if name in self._fixed:
            return self._fixed[name]
        return self._context[name]

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return name in self._fixed or name in self._context

    def __iter__(self) -> Iterator[str]:
        yield from self._fixed
        yield from (k for k in self._context if k.isidentifier() and k not in self._fixed)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ConditionNames(ExpressionNames):
    """What an edge condition (or a loop condition) sees: ``result``, ``context``, names."""

    __slots__ = ()

    def __init__(self, data: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        super().__init__(data, {"result": result})
