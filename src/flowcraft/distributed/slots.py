"""``LocalSlots``: job slots of a polling worker that a commit may fill with the successors it
claims, instead of sending them through the queue.

A commit that makes several successors ready, each certain to run (its only way in is the
committing node), takes the first for its own job (local continuation) and, for each
free slot the worker lends it (:meth:`LocalSlots.take`), one more: their leases are taken
in the commit's own write, with their attempts counted, and they run in those slots
(:meth:`LocalSlots.run`) without a message, a receive or a claim of their own. The
message that started the chain of commits is acknowledged only when all of them have
ended: if the worker dies (or stops) before, that message comes back and its redelivered
job re-announces whatever is not done (as for a local continuation). The worker lends
only slots that nothing waits for: messages it received ahead run first.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol


class LocalSlots(Protocol):
    """Free job slots of a worker, lent to one message's job for the successors it claims."""

    async def take(self, wanted: int) -> int:
        """Reserve up to ``wanted`` free slots now (never waits); return how many."""
        ...

    def give_back(self, count: int) -> None:
        """Return reserved slots that were not used (the commit that would claim failed)."""
        ...

    def run(self, job: Coroutine[Any, Any, None]) -> None:
        """Run ``job`` in one reserved slot, which is freed when it ends."""
        ...
