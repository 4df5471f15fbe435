"""What the cloud adapters' workers share beyond the job algorithm: receives that survive
a stop, and the check of their numeric options.

A receive the worker abandons is not abandoned by the service. SQS keeps a long poll
running on the server after the client has hung up (there is no call to cancel one), and
what it takes then is hidden for the whole visibility timeout; a Queue Storage GET that is
on the wire has dequeued its messages whether or not anyone reads the response. So a
receive is never cancelled: :class:`InFlightReceives` lets the waiting poll loop go, keeps
the request running, and releases (visibility 0) whatever it returns at once. The worker's
``stop`` waits for those requests — at most the long-poll wait — before its clients close.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..distributed.backend import QueueMessage
from ..errors import FlowcraftError

logger = logging.getLogger("flowcraft.distributed")

Release = Callable[[list[QueueMessage]], Awaitable[None]]


class InFlightReceives:
    """Receive requests that outlive a cancelled poll loop; their messages are released."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._orphans: set[asyncio.Task[None]] = set()

    async def run(self, receive: Awaitable[list[QueueMessage]]) -> list[QueueMessage]:
        """``await receive``; if the caller is cancelled meanwhile, the request goes on and
        what it returns is released."""
        request = asyncio.ensure_future(receive)
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            orphan = asyncio.get_running_loop().create_task(self._release_when_done(request))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
            raise

    async def _release_when_done(self, request: asyncio.Future[list[QueueMessage]]) -> None:
        try:
            messages = await request
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("an abandoned receive failed (nothing to release): %s", exc)
            return
        if not messages:
            return
        try:
            await self._release(messages)
        except Exception as exc:
            logger.warning("could not put back %d message(s) received while stopping (they "
                           "are visible again after the visibility timeout): %s",
                           len(messages), exc)
        else:
            logger.info("put back %d message(s) received while stopping", len(messages))

    @property
    def pending(self) -> int:
        return len(self._orphans)

    async def drain(self, timeout_seconds: float) -> None:
        """Wait for abandoned receives to return and be released; give up after
        ``timeout_seconds`` (their messages then reappear after the visibility timeout)."""
        if not self._orphans:
            return
        _, pending = await asyncio.wait(set(self._orphans), timeout=timeout_seconds)
        if pending:
            logger.warning("%d receive(s) still open after %.0f s; giving up on them",
                           len(pending), timeout_seconds)
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)


class WorkerOptionError(FlowcraftError, ValueError):
    """A worker option is out of range (``concurrency=0`` would idle forever, a negative
    lease would run a node again and again)."""


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise WorkerOptionError(f"{name} must be {kind}, not {value!r}")
    if not math.isfinite(value):
        raise WorkerOptionError(f"{name} must be a finite number, not {value!r}")
    return float(value)


# name -> (least value, greatest value or None, whole number?, least value itself allowed?)
Range = tuple[float, float | None, bool, bool]
WORKER_OPTION_RANGES: Mapping[str, Range] = {
    "concurrency": (1, None, True, True),
    "lease_seconds": (0, None, False, False),
    "max_receive_count": (1, None, True, True),
    "status_touch_seconds": (0, None, False, True),
    "poll_wait_seconds": (0, None, False, True),
    "batch_size": (1, None, True, True),
    "shutdown_timeout_seconds": (0, None, False, True),
}


def check_worker_options(options: Mapping[str, Any], *, max_lease_seconds: float,
                         extra: Mapping[str, Range] | None = None) -> None:
    """Refuse numeric worker options that cannot work, naming the option and its range.

    ``max_lease_seconds`` is the longest visibility timeout the queue accepts: a longer
    lease would let a message reappear while its node still runs.
    """
    ranges = {**WORKER_OPTION_RANGES, **(extra or {})}
    ranges["lease_seconds"] = (0, max_lease_seconds, False, False)
    for name, (least, greatest, integer, least_allowed) in ranges.items():
        if name not in options:
            continue
        value = _number(name, options[name], integer=integer)
        too_small = value < least if least_allowed else value <= least
        if too_small or (greatest is not None and value > greatest):
            span = f"at least {least:g}" if least_allowed else f"more than {least:g}"
            if greatest is not None:
                span += f" and at most {greatest:g}"
            raise WorkerOptionError(f"{name} must be {span}, not {options[name]!r}")
