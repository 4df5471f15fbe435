"""``RedisCoordinationStore``: the coordination operations on Redis (``redis.asyncio``).

Each operation is one round trip (multi-step ones run as a ``MULTI``
transaction). A Redis that restarts or is briefly unreachable is waited
for: connection errors are retried with backoff for up to
``reconnect_seconds`` before they surface.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger("flowcraft.azure")
T = TypeVar("T")


class RedisCoordinationStore:
    """A :class:`~flowcraft.distributed.coordination.FullCoordinationStore` on Redis.

    Workers call ``get`` and ``set_if_not_exist``; ``increment``, ``extend_ttl``,
    ``delete``, ``join_add`` and ``join_members`` are there for applications sharing
    counters, markers or sets between workers (one round trip each)."""

    def __init__(self, redis_client: Any, *, reconnect_seconds: float = 60.0,
                 calls: Counter[str] | None = None) -> None:
        self.redis = redis_client
        self.reconnect_seconds = reconnect_seconds
        self.calls = calls if calls is not None else Counter()
        """Round trips by operation (``redis.<operation>``)."""

    async def _call(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reconnect_seconds
        delay = 0.1
        while True:
            self.calls[f"redis.{what}"] += 1
            try:
                return await operation()
            except (RedisConnectionError, RedisTimeoutError, ConnectionError) as exc:
                if loop.time() >= deadline:
                    raise
                logger.warning("redis %s failed (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def increment(self, key: str, ttl_seconds: int) -> int:
        async def run() -> int:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                if ttl_seconds > 0:
                    pipe.expire(key, int(ttl_seconds))
                results = await pipe.execute()
            return int(results[0])

        return await self._call("increment", run)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool:
        async def run() -> bool:
            return bool(await self.redis.set(key, value, nx=True,
                                             ex=int(ttl_seconds) if ttl_seconds > 0 else None))

        return await self._call("set_if_not_exist", run)

    async def extend_ttl(self, key: str, ttl_seconds: int) -> bool:
        async def run() -> bool:
            return bool(await self.redis.expire(key, int(ttl_seconds)))

        return await self._call("extend_ttl", run)

    async def delete(self, key: str) -> None:
        async def run() -> None:
            await self.redis.delete(key)

        await self._call("delete", run)

    async def get(self, key: str) -> str | None:
        async def run() -> str | None:
            value = await self.redis.get(key)
            if value is None:
                return None
            return value.decode() if isinstance(value, bytes) else str(value)

        return await self._call("get", run)

    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int:
        async def run() -> int:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.sadd(key, member)
                if ttl_seconds > 0:
                    pipe.expire(key, int(ttl_seconds))
                pipe.scard(key)
                results = await pipe.execute()
            return int(results[-1])

        return await self._call("join_add", run)

    async def join_members(self, key: str) -> set[str]:
        async def run() -> set[str]:
            members = await self.redis.smembers(key)
            return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

        return await self._call("join_members", run)
