"""Helpers for the distributed-algorithm tests: a cluster of in-process workers, crash
injection, an abrupt "kill", node functions that count their executions, and the
in-memory oracle.

Imported as a plain module (pytest's default ``prepend`` import mode puts ``tests/`` on
``sys.path`` because the directory has no ``__init__.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from flowcraft import FlowRuntime, InMemoryEventBus, NodeContext, NodeResult, WorkflowBlueprint
from flowcraft.core.results import WorkflowResult
from flowcraft.distributed.adapter import RESTING_STATUSES
from flowcraft.distributed.context import InMemoryDistributedContext, InMemoryRunStore
from flowcraft.distributed.coordination import InMemoryCoordinationStore
from flowcraft.distributed.inprocess import InProcessAdapter, InProcessQueue
from flowcraft.distributed.job import JobPayload

STEPS = ("before_run", "after_run", "before_commit", "after_commit", "after_enqueue")
"""The crash points of the job algorithm, in order (``before_claim`` is before any effect)."""
BEFORE_COMMIT = frozenset({"before_run", "after_run", "before_commit"})


class SimulatedCrash(Exception):
    """Raised at a checkpoint: the worker "dies" at that step of the job algorithm."""


class CrashPlan:
    """Which checkpoints crash: ``plan.add("after_run", "b")`` crashes node ``b`` once."""

    def __init__(self) -> None:
        self._remaining: dict[tuple[str, str], int] = {}
        self.fired: list[tuple[str, str]] = []

    def add(self, step: str, node_id: str, times: int = 1) -> CrashPlan:
        self._remaining[(step, node_id)] = self._remaining.get((step, node_id), 0) + times
        return self

    def take(self, step: str, node_id: str) -> bool:
        left = self._remaining.get((step, node_id), 0)
        if left <= 0:
            return False
        self._remaining[(step, node_id)] = left - 1
        self.fired.append((step, node_id))
        return True

    @property
    def exhausted(self) -> bool:
        return all(v == 0 for v in self._remaining.values())


class PartProxy:
    """A backend part seen through a proxy: attribute reads and writes go to ``inner`` (so
    ``adapter.max_delay_seconds = 1`` still reaches the queue); subclasses intercept calls."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.inner, name, value)


class ReceiveRecorder(PartProxy):
    """A job queue that appends every message it receives to ``received``."""

    def __init__(self, inner: Any, received: list[Any]) -> None:
        super().__init__(inner)
        object.__setattr__(self, "received", received)

    async def receive(self, max_messages: int, wait_seconds: float) -> list[Any]:
        messages: list[Any] = await self.inner.receive(max_messages, wait_seconds)
        self.received.extend(messages)
        return messages


class TestAdapter(InProcessAdapter):
    """An in-process worker with crash injection and an abrupt ``kill``."""

    __test__ = False  # not a pytest test class

    def __init__(self, *args: Any, crash_plan: CrashPlan | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_plan = crash_plan
        self.checkpoints: list[tuple[str, str]] = []
        self.killed = False
        self.algorithm.checkpoint = self._checkpoint
        # An abrupt death: from now on this worker touches nothing (no ack, no visibility
        # change, no lease release, no status write, no send); its tasks are cancelled.
        backend = self.backend
        backend.queue = _Killable(self, backend.queue, ("send", "delete", "set_visibility"))
        backend.statuses = _Killable(self, backend.statuses, ("write",))
        backend.runs = _KillableRuns(self, backend.runs)

    async def _checkpoint(self, step: str, job: JobPayload) -> None:
        if self.killed:
            raise asyncio.CancelledError
        self.checkpoints.append((step, job.node_id))
        if self.crash_plan is not None and self.crash_plan.take(step, job.node_id):
            raise SimulatedCrash(f"simulated crash at {step} of {job.node_id}")

    def _check_alive(self) -> None:
        if self.killed:
            raise asyncio.CancelledError

    async def kill(self) -> None:
        """Die now, mid-job: messages stay invisible until their timeout, leases expire."""
        self.killed = True
        loop = self.worker_loop
        tasks = [t for t in [loop.poll_task, *loop.jobs] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def idle(self) -> bool:
        return not self.worker_loop.jobs


class _Killable(PartProxy):
    """A backend part whose ``guarded`` methods raise ``CancelledError`` once killed."""

    def __init__(self, adapter: TestAdapter, inner: Any, guarded: Iterable[str]) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_guarded", frozenset(guarded))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self._guarded:
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._adapter._check_alive()
            return await attribute(*args, **kwargs)

        return call


class _KillableRuns(PartProxy):
    def __init__(self, adapter: TestAdapter, inner: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_adapter", adapter)

    def context(self, run_id: str) -> Any:
        return _KillableContext(self._adapter, self.inner.context(run_id))


class _KillableContext:
    def __init__(self, adapter: TestAdapter, inner: InMemoryDistributedContext) -> None:
        self._adapter = adapter
        self._inner = inner
        self.run_id = inner.run_id

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            self._adapter._check_alive()
            return await attribute(*args, **kwargs)

        return call


class LatentRunStore(InMemoryRunStore):
    """An ``InMemoryRunStore`` whose every operation yields to the event loop first (and
    sometimes sleeps a little), like a network round trip: it lets concurrent jobs of one
    run interleave between their reads and writes, which exposes lost updates."""

    def __init__(self, seed: int = 0, max_delay: float = 0.003) -> None:
        super().__init__()
        self._random = random.Random(seed)
        self.max_delay = max_delay

    def context(self, run_id: str) -> InMemoryDistributedContext:
        return _LatentContext(self, run_id)

    async def latency(self) -> None:
        await asyncio.sleep(self._random.random() * self.max_delay)


class _LatentContext(InMemoryDistributedContext):
    store: LatentRunStore

    async def load(self) -> Any:
        await self.store.latency()
        return await super().load()

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        await self.store.latency()
        return await super().claim(*args, **kwargs)

    async def commit(self, *args: Any, **kwargs: Any) -> Any:
        await self.store.latency()
        return await super().commit(*args, **kwargs)

    async def apply(self, *args: Any, **kwargs: Any) -> Any:
        await self.store.latency()
        return await super().apply(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> Any:
        await self.store.latency()
        return await super().release(*args, **kwargs)


class Cluster:
    """Several workers on one queue, store, status table and coordination store.

    ``async with Cluster(blueprints, registry, workers=3) as cluster: ...``
    """

    def __init__(
        self,
        blueprints: Iterable[WorkflowBlueprint],
        registry: Mapping[str, Any],
        *,
        workers: int = 3,
        concurrency: int = 4,
        lease_seconds: float = 1.0,
        duplicate: bool = False,
        shuffle: bool = False,
        seed: int | None = 0,
        crash_plan: CrashPlan | None = None,
        event_bus: InMemoryEventBus | None = None,
        store: InMemoryRunStore | None = None,
        start: bool = True,
        **adapter_options: Any,
    ) -> None:
        self.blueprints = {bp.id: bp for bp in blueprints}
        self.runtime = FlowRuntime(blueprints=self.blueprints, registry=dict(registry))
        self.queue = InProcessQueue(duplicate_every_send=duplicate, shuffle=shuffle, seed=seed)
        self.store = store if store is not None else InMemoryRunStore()
        self.statuses: dict[str, dict[str, Any]] = {}
        self.coordination = InMemoryCoordinationStore()
        self.event_bus = event_bus
        self.crash_plan = crash_plan
        self.lease_seconds = lease_seconds
        self.adapter_options = {"concurrency": concurrency, "lease_seconds": lease_seconds,
                                "poll_wait_seconds": 0.05, **adapter_options}
        self.workers = [self.add_worker() for _ in range(workers)]
        self._start = start

    def add_worker(self, runtime: FlowRuntime | None = None, **options: Any) -> TestAdapter:
        runtime = runtime or self.runtime
        return TestAdapter(
            runtime.options, self.coordination, event_bus=self.event_bus, queue=self.queue,
            store=self.store, statuses=self.statuses, crash_plan=self.crash_plan,
            **{**self.adapter_options, **options},
        )

    @property
    def client(self) -> TestAdapter:
        return self.workers[0]

    async def __aenter__(self) -> Cluster:
        if self._start:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        for worker in self.workers:
            await worker.start()

    async def stop(self) -> None:
        for worker in self.workers:
            if worker.killed:
                continue
            await worker.stop(timeout_seconds=2)

    async def run(self, blueprint: WorkflowBlueprint, initial: Mapping[str, Any] | None = None,
                  *, run_id: str | None = None, timeout: float = 20) -> WorkflowResult:
        run_id = await self.client.start_workflow(blueprint, dict(initial or {}), run_id=run_id)
        return await self.client.wait_for_result(run_id, timeout=timeout, poll_interval=0.02)

    async def settle(self, timeout: float = 10.0, quiet: float = 0.1) -> None:
        """Wait until no message is left in the queue (visible or not) and no worker runs
        a job, for ``quiet`` seconds in a row."""
        deadline = time.monotonic() + timeout
        calm_since: float | None = None
        while True:
            busy = len(self.queue) > 0 or any(
                not w.idle for w in self.workers if not w.killed)
            now = time.monotonic()
            if busy:
                calm_since = None
            elif calm_since is None:
                calm_since = now
            elif now - calm_since >= quiet:
                return
            if now > deadline:
                raise TimeoutError(f"cluster did not settle: {len(self.queue)} messages left")
            await asyncio.sleep(0.01)

    def status(self, run_id: str) -> str | None:
        return (self.statuses.get(run_id) or {}).get("status")


# -- node functions ---------------------------------------------------------------------------


class Executions:
    """Counts node executions by node id (``counts``) and keeps every call (``calls``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.calls: list[tuple[str, Any]] = []

    def record(self, ctx: NodeContext) -> None:
        self.counts[ctx.node_id] += 1
        self.calls.append((ctx.node_id, ctx.input))

    def node(self, compute: Callable[[NodeContext], Any] | None = None, *,
             delay: float = 0.0) -> Callable[[NodeContext], Any]:
        """A node that records its execution and returns ``compute(ctx)`` (default: a
        value derived only from the node id and its input, so it is deterministic)."""

        async def node(ctx: NodeContext) -> Any:
            self.record(ctx)
            if delay:
                await asyncio.sleep(delay)
            if compute is None:
                return {"node": ctx.node_id, "input": ctx.input}
            return compute(ctx)

        return node

    def reset(self) -> None:
        self.counts.clear()
        self.calls.clear()


def result_with(output: Any = None, action: str | None = None) -> Callable[[NodeContext], Any]:
    return lambda ctx: NodeResult(output=output, action=action)


# -- oracle -----------------------------------------------------------------------------------


def comparable(context: Mapping[str, Any]) -> dict[str, Any]:
    """A final context without what legitimately differs between the in-memory and the
    distributed run: the stored ``blueprintVersion`` and the worker's iteration note in
    ``_awaitingDetails``."""
    out = {k: v for k, v in context.items() if k != "blueprintVersion"}
    details = out.get("_awaitingDetails")
    if isinstance(details, Mapping):
        out["_awaitingDetails"] = {
            node: {k: v for k, v in d.items() if k != "iteration"} if isinstance(d, Mapping)
            else d for node, d in details.items()
        }
    return out


async def oracle(blueprint: WorkflowBlueprint, registry: Mapping[str, Any],
                 initial: Mapping[str, Any] | None = None, *, run_id: str) -> WorkflowResult:
    runtime = FlowRuntime(blueprints={blueprint.id: blueprint}, registry=dict(registry))
    return await runtime.run(blueprint, dict(initial or {}), run_id=run_id)


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
                     interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


async def drive(cluster: Cluster, run_id: str, *, timeout: float = 30.0,
                reconcile_every: float = 1.0) -> tuple[WorkflowResult, list[list[str]]]:
    """Wait for a run to rest, reconciling it whenever the cluster is quiet and the run is
    still running (what the periodic reconciler does). Returns the result and what each
    reconcile call enqueued."""
    deadline = time.monotonic() + timeout
    reconciled: list[list[str]] = []
    while True:
        if cluster.status(run_id) in RESTING_STATUSES:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {cluster.status(run_id)}")
        with contextlib.suppress(TimeoutError):
            await cluster.settle(timeout=reconcile_every, quiet=0.05)
        if cluster.status(run_id) in RESTING_STATUSES:
            break
        if len(cluster.queue) == 0:
            enqueued = await cluster.client.reconcile(run_id)
            reconciled.append(enqueued)
            if not enqueued:
                await asyncio.sleep(0.05)
    result = await cluster.client.wait_for_result(run_id, timeout=1, poll_interval=0.01)
    return result, reconciled


@contextlib.asynccontextmanager
async def meanwhile(algorithm: Any, step: str, node_id: str,
                    action: Callable[[], Awaitable[Any]]) -> AsyncIterator[None]:
    """Inside the block, ``algorithm`` awaits ``action`` when a job of ``node_id`` reaches the
    checkpoint ``step``: other workers' jobs landing between two steps of this one."""
    checkpoint = algorithm.checkpoint

    async def hooked(step_name: str, job: JobPayload) -> None:
        if step_name == step and job.node_id == node_id:
            await action()
        await checkpoint(step_name, job)

    algorithm.checkpoint = hooked
    try:
        yield
    finally:
        algorithm.checkpoint = checkpoint
