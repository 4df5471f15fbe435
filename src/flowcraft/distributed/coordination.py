"""Coordination stores: small atomic operations shared by all workers of a deployment.

Two contracts:

* :class:`CoordinationStore` is what the engine calls, and all a custom store
  must offer: ``get`` and ``set_if_not_exist`` (first writer wins, with a time to
  live). Workers use them for the first arrival at an ``any`` join, the poison
  and cancel markers a failed node leaves for its successors (as the TypeScript
  library writes them), and the first sighting of a job naming a blueprint this
  worker does not know. The job algorithm decides every other join from the
  run's single conditional context write (see :mod:`flowcraft.distributed.algorithm`),
  so a healthy run touches the coordination store only for ``any`` joins.
* :class:`FullCoordinationStore` adds the rest of the TypeScript library's five
  operations (``increment``, ``extend_ttl``, ``delete``) and an idempotent
  set-based join primitive (``join_add``: adding the same member twice counts
  once, so a redelivered job never counts twice; ``join_members``). The stores
  flowcraft provides (in memory, :class:`~flowcraft.adapters.aws.DynamoDbCoordinationStore`,
  :class:`~flowcraft.adapters.azure.RedisCoordinationStore`) offer all of them
  for applications and tools that share counters or markers between workers;
  the engine needs none of them.

Keys start with ``flowcraft:``. A ``ttl_seconds`` of 0 or less means no expiry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

KEY_PREFIX = "flowcraft:"
COORDINATION_TTL_SECONDS = 7 * 24 * 3600
"""How long the job algorithm's keys live (first arrivals, failure markers, sightings)."""


def poison_key(run_id: str, node_id: str) -> str:
    return f"{KEY_PREFIX}poison:{run_id}:{node_id}"


def cancel_key(run_id: str, node_id: str) -> str:
    return f"{KEY_PREFIX}cancel:{run_id}:{node_id}"


def any_key(run_id: str, node_id: str, iteration: int) -> str:
    """The first arrival at an ``any`` join (the predecessor that took it)."""
    return f"{KEY_PREFIX}any:{run_id}:{node_id}:{iteration}"


@runtime_checkable
class CoordinationStore(Protocol):
    """What the engine calls on a coordination store (see the module docstring)."""

    async def get(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None`` (never set, deleted or expired)."""
        ...

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool:
        """Store ``value`` under ``key`` unless a live value is there; ``True`` if stored.
        Of concurrent callers exactly one gets ``True``."""
        ...


@runtime_checkable
class FullCoordinationStore(CoordinationStore, Protocol):
    """Every operation of the provided stores: the engine's two and five more."""

    async def increment(self, key: str, ttl_seconds: int) -> int:
        """Add one to the counter ``key`` (absent or expired counts from 0); return it."""
        ...

    async def extend_ttl(self, key: str, ttl_seconds: int) -> bool:
        """Restart ``key``'s time to live; ``False`` if it is absent or expired."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key`` (a value, counter or join set); no error if it is absent."""
        ...

    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int:
        """Add ``member`` to the set ``key`` (once, however often it is added); return the
        number of members."""
        ...

    async def join_members(self, key: str) -> set[str]:
        """The members of the set ``key`` (empty if absent or expired)."""
        ...


class InMemoryCoordinationStore:
    """A :class:`FullCoordinationStore` in one process: for tests and the in-process
    backend. ``calls`` counts operations."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[object, float]] = {}
        self._lock = asyncio.Lock()
        self.calls = 0

    def _live(self, key: str) -> object | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires and expires < time.monotonic():
            del self._values[key]
            return None
        return value

    @staticmethod
    def _expiry(ttl_seconds: int) -> float:
        return time.monotonic() + ttl_seconds if ttl_seconds > 0 else 0.0

    async def increment(self, key: str, ttl_seconds: int) -> int:
        self.calls += 1
        async with self._lock:
            current = self._live(key)
            value = (int(current) if isinstance(current, int | str) else 0) + 1
            self._values[key] = (value, self._expiry(ttl_seconds))
            return value

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool:
        self.calls += 1
        async with self._lock:
            if self._live(key) is not None:
                return False
            self._values[key] = (value, self._expiry(ttl_seconds))
            return True

    async def extend_ttl(self, key: str, ttl_seconds: int) -> bool:
        self.calls += 1
        async with self._lock:
            value = self._live(key)
            if value is None:
                return False
            self._values[key] = (value, self._expiry(ttl_seconds))
            return True

    async def delete(self, key: str) -> None:
        self.calls += 1
        self._values.pop(key, None)

    async def get(self, key: str) -> str | None:
        self.calls += 1
        value = self._live(key)
        if value is None or isinstance(value, set):
            return None
        return str(value)

    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int:
        self.calls += 1
        async with self._lock:
            members = self._live(key)
            if not isinstance(members, set):
                members = set()
            members.add(member)
            self._values[key] = (members, self._expiry(ttl_seconds))
            return len(members)

    async def join_members(self, key: str) -> set[str]:
        self.calls += 1
        members = self._live(key)
        return set(members) if isinstance(members, set) else set()
