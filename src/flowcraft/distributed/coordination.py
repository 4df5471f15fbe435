"""Coordination stores: small atomic operations shared by all workers of a deployment.

The protocol has the TypeScript library's five operations plus an idempotent
set-based join primitive (``join_add``: adding the same member twice counts
once, so a redelivered job never counts twice). Keys start with ``flowcraft:``.

The job algorithm decides joins from the run's single conditional context
write (see :mod:`flowcraft.distributed.algorithm`), so a healthy run touches the
coordination store only when a node fails (poison and cancel markers for its
successors, as the reference writes them) and for worker-level bookkeeping.
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
    async def increment(self, key: str, ttl_seconds: int) -> int: ...
    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool: ...
    async def extend_ttl(self, key: str, ttl_seconds: int) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def get(self, key: str) -> str | None: ...
    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int: ...
    async def join_members(self, key: str) -> set[str]: ...


class InMemoryCoordinationStore:
    """A coordination store in one process: for tests and the in-process backend."""

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
