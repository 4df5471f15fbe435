"""``Stepper``: an in-memory run that executes one node at a time, for tests and debugging.

The stepper is the ordinary in-memory run with a gate in front of each node execution:
the run schedules nodes exactly as it always does (routing, joins, skips, loops, awaits),
but every scheduled node waits at the gate until :meth:`Stepper.next` lets it through,
one at a time, in the order they became ready. Between steps nothing runs, so the
context can be inspected (:attr:`Stepper.state`) and the ready nodes listed
(:attr:`Stepper.pending`). There is no second engine: only the gate is new.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from ..blueprint import WorkflowBlueprint
from ..context import public_view
from ..core.engine import NodeEngine
from ..core.executor import NodeError
from ..core.results import WorkflowResult
from ..core.routing import AWAITING_DETAILS_KEY, output_key, read_record
from ..nodes.base import CancellationSignal
from .runtime import _InMemoryRun

__all__ = ["Step", "Stepper"]


@dataclass(frozen=True)
class Step:
    """What one step did: which node ran and how it ended."""

    node_id: str
    output: Any = None
    action: str | None = None
    error: NodeError | None = None
    awaiting: dict[str, Any] | None = None
    """The node parked the run (``wait``, a long ``sleep``): its awaiting details."""


class _GatedRun(_InMemoryRun):
    """An in-memory run whose scheduled nodes wait for their turn at a gate."""

    inline_successors = False  # every node waits at the gate in its own task

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.waiting: list[tuple[str, asyncio.Future[None]]] = []
        self.changed = asyncio.Event()
        self.begun = False  # the start nodes are scheduled

    async def _finish(self) -> WorkflowResult:
        self.begun = True
        self.changed.set()
        return await super()._finish()

    async def _execute(self, node_id: str, generation: int,
                       resume: dict[str, Any] | None) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((node_id, turn))
        self.changed.set()
        try:
            await turn
        except asyncio.CancelledError:
            # Cancelled before its turn (the run was cancelled): it never ran.
            self.running -= 1
            if self.running == 0:
                self._now_idle()
            raise
        try:
            await super()._execute(node_id, generation, resume)
        finally:
            self.changed.set()

    @property
    def settled(self) -> bool:
        """Every scheduled node is waiting at the gate (none is on its way or running)."""
        return self.begun and len(self.waiting) >= self.running


class Stepper:
    """Run a blueprint one node per :meth:`next`; see the module docstring.

    Made by :meth:`FlowRuntime.stepper`; use it as ``async with runtime.stepper(...) as
    stepper`` (or call :meth:`close`) so that a run left unfinished is cancelled.
    """

    def __init__(self, engine: NodeEngine, blueprint: WorkflowBlueprint, data: dict[str, Any],
                 run_id: str, signal: CancellationSignal | None = None) -> None:
        self._run = _GatedRun(engine, blueprint, data, run_id, signal, None)
        self._task: asyncio.Task[WorkflowResult] | None = None
        self._result: WorkflowResult | None = None

    async def __aenter__(self) -> Stepper:
        await self._started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _started(self) -> asyncio.Task[WorkflowResult]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run.start())
            await self._settle()
        return self._task

    async def _settle(self) -> None:
        """Wait until nothing moves: every scheduled node is at the gate, or the run ended."""
        assert self._task is not None
        while not self._task.done() and not self._run.settled:
            self._run.changed.clear()
            waiter = asyncio.ensure_future(self._run.changed.wait())
            await asyncio.wait((waiter, self._task), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if not self._run.waiting and self._run.running == 0:
            self._result = await self._task

    @property
    def pending(self) -> list[str]:
        """The nodes ready to run, in the order :meth:`next` runs them."""
        return [node_id for node_id, _ in self._run.waiting]

    @property
    def done(self) -> bool:
        """Whether the run has ended (completed, failed, awaiting, cancelled or stalled)."""
        return self._result is not None

    @property
    def state(self) -> dict[str, Any]:
        """The run's context now (a copy, without the engine's bookkeeping)."""
        return public_view(self._run.data)

    @property
    def result(self) -> WorkflowResult | None:
        """The run's result once it has ended, else ``None``."""
        return self._result

    async def next(self) -> Step | None:
        """Run the next ready node to its end (its routing and skips included) and say what
        it did; ``None`` once the run has ended."""
        await self._started()
        if self._result is not None or not self._run.waiting:
            return None
        node_id, turn = self._run.waiting.pop(0)
        errors_before = len(self._run.errors)
        count_before = read_record(self._run.data, node_id)
        turn.set_result(None)
        await self._settle()
        return self._describe(node_id, errors_before, count_before)

    async def run_to_end(self) -> WorkflowResult:
        """Run the remaining nodes; the run's result."""
        while await self.next() is not None:
            pass
        assert self._result is not None
        return self._result

    async def close(self) -> None:
        """Cancel a run left unfinished (its waiting nodes never run)."""
        if self._task is None or self._task.done():
            return
        self._run.signal.set()
        with contextlib.suppress(asyncio.CancelledError):
            self._result = await self._task

    def _describe(self, node_id: str, errors_before: int, record_before: Any) -> Step:
        data = self._run.data
        errors = [e for e in self._run.errors[errors_before:] if e.node_id == node_id]
        if errors:
            return Step(node_id, error=errors[0])
        details = (data.get(AWAITING_DETAILS_KEY) or {}).get(node_id)
        record = read_record(data, node_id)
        if details is not None and record is record_before:
            return Step(node_id, awaiting=dict(details))
        return Step(node_id, output=data.get(output_key(node_id)),
                    action=record.action if record else None)
