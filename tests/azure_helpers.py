"""Helpers for the Azure adapter tests: workers on the ``azure`` fixture's queue, database and
containers, queue and item inspection, and the TypeScript library's client.

Imported as a plain module (``tests/`` is on ``sys.path`` under pytest's default import
mode), like ``distributed_helpers``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from distributed_helpers import PartProxy, ReceiveRecorder
from flowcraft import FlowRuntime, WorkflowBlueprint
from flowcraft.adapters.azure import AzureQueueAdapter, CosmosDbContext, RedisCoordinationStore
from flowcraft.distributed.backend import Backend, QueueMessage
from flowcraft.distributed.job import JobPayload

REPO = Path(__file__).resolve().parents[1]
LOCAL_SERVICES = REPO / "tools" / "local-services"
SEED_CLIENT = Path(__file__).resolve().parent / "js" / "azure_start_workflow.mjs"

FAST: dict[str, Any] = {"poll_wait_seconds": 1, "lease_seconds": 5, "max_poll_interval": 0.2,
                        "status_touch_seconds": 0}
"""Adapter options that keep the tests quick (short polls and leases)."""

CommitHook = Callable[[str, str], Awaitable[None]]
"""``await hook(run_id, node_id)`` just before a node's commit is sent."""


class RecordingAzureAdapter(AzureQueueAdapter):
    """An ``AzureQueueAdapter`` that remembers every message it received, can crash at the
    job algorithm's checkpoints (``crash_at={("before_run", "b")}`` crashes every attempt of
    node ``b`` there) and can hold commits (``before_commit`` hook on its contexts)."""

    def __init__(self, *args: Any, crash_at: Iterable[tuple[str, str]] = (),
                 before_commit: CommitHook | None = None, **kwargs: Any) -> None:
        self.received: list[QueueMessage] = []
        self.crash_at = set(crash_at)
        self.before_commit = before_commit
        super().__init__(*args, **kwargs)
        self.algorithm.checkpoint = self._checkpoint

    def create_backend(self) -> Backend:
        backend = super().create_backend()
        backend.queue = ReceiveRecorder(backend.queue, self.received)
        backend.runs = _HeldCommits(self, backend.runs)
        return backend

    async def _checkpoint(self, step: str, job: JobPayload) -> None:
        if (step, job.node_id) in self.crash_at:
            raise RuntimeError(f"injected crash at {step} of {job.node_id}")

    def received_jobs(self, node_id: str) -> list[QueueMessage]:
        out = []
        for message in self.received:
            with contextlib.suppress(Exception):
                if decode(str(message.body)).get("nodeId") == node_id:
                    out.append(message)
        return out


class _HeldCommits(PartProxy):
    """The adapter's run store, whose contexts wait for its ``before_commit`` hook (if any)
    before each commit is sent."""

    def __init__(self, adapter: RecordingAzureAdapter, inner: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_adapter", adapter)

    def context(self, run_id: str) -> CosmosDbContext:
        context: CosmosDbContext = self.inner.context(run_id)
        if self._adapter.before_commit is None:
            return context
        hook = self._adapter.before_commit
        commit = context.commit

        async def held_commit(node_id: str, *args: Any, **kwargs: Any) -> Any:
            await hook(run_id, node_id)
            return await commit(node_id, *args, **kwargs)

        context.commit = held_commit  # type: ignore[method-assign]
        return context


def runtime_for(blueprints: Iterable[WorkflowBlueprint],
                registry: Mapping[str, Any]) -> FlowRuntime:
    return FlowRuntime(blueprints={bp.id: bp for bp in blueprints}, registry=dict(registry))


def make_adapter(azure: Any, blueprints: Iterable[WorkflowBlueprint],
                 registry: Mapping[str, Any], **options: Any) -> RecordingAzureAdapter:
    """A worker (and client) on the fixture's resources, with :data:`FAST` timings."""
    runtime = runtime_for(blueprints, registry)
    return RecordingAzureAdapter(
        runtime.options, RedisCoordinationStore(azure.redis, reconnect_seconds=30),
        azure.queue, azure.cosmos,
        cosmos_database_name=azure.database,
        context_container_name=azure.context_container,
        status_container_name=azure.status_container,
        **{**FAST, **options},
    )


@contextlib.asynccontextmanager
async def workers(azure: Any, blueprints: Iterable[WorkflowBlueprint],
                  registry: Mapping[str, Any], count: int = 1,
                  **options: Any) -> AsyncIterator[tuple[RecordingAzureAdapter, ...]]:
    """``count`` running workers; stopped (jobs given 5 s to finish) on exit."""
    blueprints = list(blueprints)
    started = tuple(make_adapter(azure, blueprints, registry, **options) for _ in range(count))
    for worker in started:
        await worker.start()
    try:
        yield started
    finally:
        for worker in started:
            await worker.stop(timeout_seconds=5)


# -- the queue ---------------------------------------------------------------------------------


def poison_client(azure: Any) -> Any:
    return azure.queue_service.get_queue_client(f"{azure.queue_name}-poison")


async def peek(queue: Any) -> list[Any]:
    """The visible messages (up to 32), left in place and not counted as received."""
    return list(await queue.peek_messages(max_messages=32))


async def message_count(queue: Any) -> int:
    """Every message of the queue, visible or not (Azurite counts them exactly)."""
    properties = await queue.get_queue_properties()
    return int(properties.approximate_message_count or 0)


async def receive_all(queue: Any, *, delete: bool = True,
                      visibility_timeout: int = 30) -> list[Any]:
    """Receive every visible message (and delete it, by default)."""
    found: list[Any] = []
    async for message in queue.receive_messages(messages_per_page=32,
                                                visibility_timeout=visibility_timeout):
        found.append(message)
        if delete:
            await queue.delete_message(message)
    return found


async def wait_queue_empty(queue: Any, timeout: float = 15.0) -> None:
    async def empty() -> bool:
        return await message_count(queue) == 0

    await wait_for(empty, timeout=timeout, what="an empty queue")


def decode(content: str) -> dict[str, Any]:
    """A message body as the job dict (base64 JSON or plain JSON)."""
    text = content.strip()
    if text.startswith("{"):
        return dict(json.loads(text))
    return dict(json.loads(base64.b64decode(text, validate=True)))


async def wait_for(predicate: Callable[[], Any], timeout: float = 20.0,
                   interval: float = 0.05, what: str = "condition") -> Any:
    """Wait until ``predicate()`` (sync or async) returns a truthy value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s")
        await asyncio.sleep(interval)


# -- Cosmos items ------------------------------------------------------------------------------


def containers(azure: Any) -> tuple[Any, Any]:
    """``(contexts, statuses)`` container clients of the fixture's database."""
    database = azure.cosmos.get_database_client(azure.database)
    return (database.get_container_client(azure.context_container),
            database.get_container_client(azure.status_container))


async def items_with_id(container: Any, item_id: str) -> list[dict[str, Any]]:
    """Every item with this id, whatever its partition (a cross-partition query)."""
    return [item async for item in container.query_items(
        "SELECT * FROM c WHERE c.id = @id", parameters=[{"name": "@id", "value": item_id}])]


def context_of(azure: Any, run_id: str) -> CosmosDbContext:
    return CosmosDbContext(run_id, client=azure.cosmos, database_name=azure.database,
                           container_name=azure.context_container)


# -- the TypeScript library's client --------------------------------------------------------------


def typescript_client_environment(azure: Any) -> dict[str, str]:
    """The fixture's settings, with TLS checks off for this node process only (the local
    Cosmos server's certificate is self-signed)."""
    return {**azure.environment(), "NODE_TLS_REJECT_UNAUTHORIZED": "0"}


async def run_typescript_client(azure: Any, blueprint: WorkflowBlueprint,
                          initial_context: Mapping[str, Any], tmp_path: Path,
                          timeout: float = 60.0) -> str:
    """Start a run with the TypeScript library's ``startWorkflow`` (tests/js); return its id."""
    assert (LOCAL_SERVICES / "node_modules" / "flowcraft").is_dir(), (
        "the reference's npm packages are missing: run scripts/setup")
    blueprint_file = tmp_path / f"{blueprint.id}.json"
    blueprint_file.write_text(json.dumps(blueprint.to_dict()), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        "node", str(SEED_CLIENT), str(blueprint_file),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=typescript_client_environment(azure), cwd=REPO,
    )
    out, err = await asyncio.wait_for(
        process.communicate(json.dumps(initial_context).encode()), timeout)
    stdout, stderr = out.decode(), err.decode()
    assert process.returncode == 0, f"node failed ({process.returncode}):\n{stderr}"
    match = re.search(r"^Workflow (\S+) started\.$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
