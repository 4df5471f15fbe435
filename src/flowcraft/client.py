"""``Client``: start, watch, list, cancel and resume distributed runs from an application.

A client holds the SDK clients of one cloud (opened from the same settings and
environment variables as the command line, or handed in by the caller) and an
adapter built on them; it never processes jobs. Every method is async and
never blocks the event loop, so a web app calls it from its handlers;
:class:`SyncClient` wraps it for scripts.

* ``start`` stores the run with a conditional create (a taken run id raises
  :class:`~flowcraft.errors.RunAlreadyExistsError`);
* ``status`` reads the status record and the context: the run's state, its
  timestamps and each node's state (:class:`RunStatus`);
* ``result`` waits for the run to rest, polling 50 ms, then doubling to 2 s;
* ``list_runs`` pages through the status index (DynamoDB: the global secondary
  index ``status-lastUpdated``; Cosmos DB: a query ordered by ``lastUpdated``),
  never a scan of the table;
* ``cancel`` marks the run cancelled in its context (workers drop its jobs, a
  node that finishes schedules nothing, a running node's ``ctx.signal`` is set
  at its next lease renewal) and in its status record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from .blueprint import WorkflowBlueprint, load_blueprints
from .context import PatchOperation, public_view
from .core.options import RuntimeOptions
from .core.routing import AWAITING_IDS_KEY
from .distributed.adapter import FINAL_STATUSES, RESTING_STATUSES, now_iso
from .distributed.backend import RunPage as RunPage
from .distributed.backend import RunSummary as RunSummary
from .distributed.backend import decode_cursor as decode_cursor
from .distributed.backend import encode_cursor as encode_cursor
from .distributed.backend import iso_datetime
from .distributed.context import BLUEPRINT_KEY, RUN_STATE_KEY
from .errors import FlowcraftError
from .runview import NodeState as NodeState
from .runview import node_states as node_views

RunState = Literal["running", "awaiting", "completed", "failed", "cancelled"]
RUN_STATES: tuple[RunState, ...] = ("running", "awaiting", "completed", "failed", "cancelled")
STATUS_INDEX = "status-lastUpdated"
"""The DynamoDB global secondary index (and the ordering of the Cosmos query) runs are
listed through: hash ``status``, range ``lastUpdated`` (ISO strings sort as times)."""


class RunNotFoundError(FlowcraftError):
    """No run with this id is stored (its status record and context are absent)."""


@dataclass(frozen=True)
class RunError:
    node_id: str | None
    type: str
    message: str
    traceback: str | None = None


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    status: RunState
    blueprint_id: str | None
    started_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None
    nodes: dict[str, NodeState] = field(default_factory=dict)
    errors: list[RunError] = field(default_factory=list)
    awaiting: list[str] = field(default_factory=list)
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATUSES

    def progress(self) -> tuple[int, int]:
        """(nodes resolved — done, skipped or failed — , all nodes known)."""
        resolved = sum(1 for s in self.nodes.values() if s in ("done", "skipped", "failed"))
        return resolved, len(self.nodes)

    def to_dict(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {"runId": self.run_id, "status": self.status, "blueprintId": self.blueprint_id,
                "startedAt": iso(self.started_at), "updatedAt": iso(self.updated_at),
                "finishedAt": iso(self.finished_at), "nodes": self.nodes,
                "awaiting": self.awaiting, "reason": self.reason,
                "errors": [{"nodeId": e.node_id, "type": e.type, "message": e.message,
                            **({"traceback": e.traceback} if e.traceback else {})}
                           for e in self.errors]}


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: RunState
    context: dict[str, Any]
    errors: list[RunError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        return {"runId": self.run_id, "status": self.status, "context": self.context,
                "errors": [{"nodeId": e.node_id, "type": e.type, "message": e.message}
                           for e in self.errors]}


def node_states(blueprint: WorkflowBlueprint | None, data: Mapping[str, Any],
                now: float | None = None) -> dict[str, NodeState]:
    """Each node's state from a stored context, as :func:`flowcraft.runview.node_states`
    derives it (the one derivation every view of a run uses): nodes of the blueprint (when
    known) in blueprint order, then nodes only the context names (dynamic nodes)."""
    return {node_id: view.state
            for node_id, view in node_views(blueprint, data, now=now).items()}


def _run_errors(record: Mapping[str, Any], data: Mapping[str, Any]) -> list[RunError]:
    run_state = data.get(RUN_STATE_KEY)
    stored = run_state.get("error") if isinstance(run_state, Mapping) else None
    if isinstance(stored, Mapping) and stored.get("message"):
        return [RunError(stored.get("nodeId") or record.get("failedNodeId"),
                         str(stored.get("errorType") or "FlowcraftError"),
                         str(stored["message"]), stored.get("traceback"))]
    if record.get("status") == "failed" and record.get("error"):
        return [RunError(record.get("failedNodeId"), "FlowcraftError", str(record["error"]))]
    return []


def _effective_status(record: Mapping[str, Any], data: Mapping[str, Any]) -> RunState:
    run_state = data.get(RUN_STATE_KEY)
    if isinstance(run_state, Mapping) and run_state.get("status") == "cancelled":
        return "cancelled"  # the context is written first: it decides
    status = record.get("status")
    return status if status in RUN_STATES else "running"


class Client:
    """Start and watch runs on AWS (SQS + DynamoDB) or Azure (Queue Storage + Cosmos DB).

    ``Client.from_env("aws")`` reads the command line's environment variables;
    ``Client.from_aws(sqs, dynamodb, queue_url, ...)`` / ``Client.from_azure(...)`` use SDK
    clients the caller owns. ``blueprints`` (a directory, a list or a dict) is needed by
    ``start``, ``resume`` and ``reconcile``; the other methods work without it.
    Use ``async with`` (or ``await client.close()``) to close the clients it opened."""

    def __init__(self, opener: Callable[[contextlib.AsyncExitStack], Awaitable[Any]],
                 cloud: Literal["aws", "azure"], blueprints: Any = None) -> None:
        self.cloud = cloud
        self.blueprints = _blueprints(blueprints)
        self._opener = opener
        self._stack: contextlib.AsyncExitStack | None = None
        self._adapter: Any = None
        self._lock = asyncio.Lock()

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_env(cls, cloud: Literal["aws", "azure"], *, blueprints: Any = None,
                 **settings: Any) -> Client:
        """Settings from keyword arguments (the CLI flags' names, e.g. ``queue_url``,
        ``status_table``), else the environment variables, else the setup guides' names."""
        from .adapters import connect as backends

        if cloud == "aws":
            return cls.from_settings(backends.AwsSettings.resolve(**settings),
                                     blueprints=blueprints)
        if cloud == "azure":
            return cls.from_settings(backends.AzureSettings.resolve(**settings),
                                     blueprints=blueprints)
        raise FlowcraftError(f"unknown cloud {cloud!r}: use 'aws' or 'azure'")

    @classmethod
    def from_settings(cls, settings: Any, *, blueprints: Any = None) -> Client:
        """A client on resolved :class:`~flowcraft.adapters.connect.AwsSettings` or
        :class:`~flowcraft.adapters.connect.AzureSettings`; it opens (and closes) its SDK
        clients."""
        from .adapters import connect as backends

        client: Client
        if isinstance(settings, backends.AwsSettings):
            def open_adapter(stack: contextlib.AsyncExitStack) -> Awaitable[Any]:
                return stack.enter_async_context(
                    backends.aws_adapter(settings, _options(client.blueprints)))
            client = cls(open_adapter, "aws", blueprints)
        else:
            def open_adapter(stack: contextlib.AsyncExitStack) -> Awaitable[Any]:
                return stack.enter_async_context(
                    backends.azure_adapter(settings, _options(client.blueprints)))
            client = cls(open_adapter, "azure", blueprints)
        return client

    @classmethod
    def from_aws(cls, sqs: Any, dynamodb: Any, queue_url: str, *, blueprints: Any = None,
                 context_table: str = "flowcraft-contexts",
                 status_table: str = "flowcraft-statuses",
                 coordination_table: str = "flowcraft-coordination",
                 payloads: Any = None) -> Client:
        """A client on aiobotocore clients the caller opened (and closes). ``payloads``: the
        workers' claim-check store (an ``S3PayloadStore``), when they use one."""
        from .adapters.aws import DynamoDbCoordinationStore, SqsAdapter

        client: Client

        async def open_aws(stack: contextlib.AsyncExitStack) -> Any:
            return SqsAdapter(_options(client.blueprints), DynamoDbCoordinationStore(
                client=dynamodb, table_name=coordination_table), sqs, dynamodb, queue_url,
                context_table_name=context_table, status_table_name=status_table,
                payloads=payloads)
        client = cls(open_aws, "aws", blueprints)
        return client

    @classmethod
    def from_azure(cls, queue_client: Any, cosmos_client: Any, redis: Any, *,
                   blueprints: Any = None, database: str = "flowcraft-db",
                   context_container: str = "contexts",
                   status_container: str = "statuses", payloads: Any = None) -> Client:
        """A client on Azure SDK clients (and a ``redis.asyncio`` client) the caller owns.
        ``payloads``: the workers' claim-check store (a ``BlobPayloadStore``), when they use
        one."""
        from .adapters.azure import AzureQueueAdapter, RedisCoordinationStore

        client: Client

        async def open_azure(stack: contextlib.AsyncExitStack) -> Any:
            return AzureQueueAdapter(
                _options(client.blueprints), RedisCoordinationStore(redis), queue_client,
                cosmos_client, cosmos_database_name=database,
                context_container_name=context_container,
                status_container_name=status_container, payloads=payloads)
        client = cls(open_azure, "azure", blueprints)
        return client

    async def __aenter__(self) -> Client:
        await self._open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        stack, self._stack, self._adapter = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _open(self) -> Any:
        async with self._lock:
            if self._adapter is None:
                stack = contextlib.AsyncExitStack()
                try:
                    self._adapter = await self._opener(stack)
                except BaseException:
                    await stack.aclose()
                    raise
                self._stack = stack
            self._adapter.runtime_options.blueprints.update(self.blueprints)
            return self._adapter

    @property
    def adapter(self) -> Any:
        """The adapter underneath (after the client was opened)."""
        return self._adapter

    # -- runs ------------------------------------------------------------------------------

    async def start(self, blueprint_id: str, context: Mapping[str, Any] | None = None,
                    run_id: str | None = None) -> str:
        """Start a run; return its id. A taken ``run_id`` raises ``RunAlreadyExistsError``
        and leaves that run untouched."""
        adapter = await self._open()
        self._need_blueprint(blueprint_id)
        return str(await adapter.start_workflow(blueprint_id, context, run_id=run_id))

    async def _load(self, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        adapter = await self._open()
        record, data = await asyncio.gather(adapter.backend.statuses.read(run_id),
                                            adapter.create_context(run_id).load())
        if record is None and data is None:
            raise RunNotFoundError(f"no run '{run_id}' is stored (check the id, and that the "
                                   f"client uses the same tables or containers as the workers)",
                                   run_id=run_id)
        return record or {}, data or {}

    async def status(self, run_id: str) -> RunStatus:
        record, data = await self._load(run_id)
        blueprint_id = record.get("blueprintId") or data.get(BLUEPRINT_KEY)
        blueprint = self.blueprints.get(blueprint_id) if blueprint_id else None
        status = _effective_status(record, data)
        updated = iso_datetime(record.get("lastUpdated"))
        run_state = data.get(RUN_STATE_KEY)
        reason = (run_state.get("reason") if isinstance(run_state, Mapping) else None) or (
            record.get("error") or record.get("reason"))
        return RunStatus(
            run_id=run_id, status=status, blueprint_id=blueprint_id,
            started_at=iso_datetime(record.get("startedAt")), updated_at=updated,
            finished_at=updated if status in FINAL_STATUSES else None,
            nodes=node_states(blueprint, data), errors=_run_errors(record, data),
            awaiting=list(data.get(AWAITING_IDS_KEY) or ()), reason=reason,
        )

    async def result(self, run_id: str, timeout: float = 60.0, *,
                     first_poll: float = 0.05, max_poll: float = 2.0) -> RunResult:
        """Wait until the run rests (completed, failed, cancelled or awaiting) and return
        its result; polls after 50 ms, doubling to 2 s. ``TimeoutError`` after
        ``timeout`` seconds (the run goes on)."""
        adapter = await self._open()
        deadline = time.monotonic() + timeout
        delay = first_poll
        while True:
            record = await adapter.backend.statuses.read(run_id)
            if record is None:
                await self._load(run_id)  # RunNotFoundError when there is no context either
            status = (record or {}).get("status")
            if status in RESTING_STATUSES:
                break
            if status == "running":
                data = await adapter.create_context(run_id).load() or {}
                if _effective_status(record or {}, data) == "cancelled":
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run {run_id} did not finish within {timeout:g}s "
                                   f"(status: {status or 'unknown'}); it goes on")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, max_poll)
        record, data = await self._load(run_id)
        return RunResult(run_id, _effective_status(record, data), public_view(data),
                         _run_errors(record, data))

    async def list_runs(self, status: str | None = None, blueprint_id: str | None = None,
                        since: datetime | str | None = None, limit: int = 50,
                        cursor: str | None = None) -> RunPage:
        """Runs, newest update first within each status, through the status index. Without
        ``status`` the statuses are listed one after the other (running, awaiting,
        completed, failed, cancelled). Pass ``next_cursor`` back for the next page."""
        if status is not None and status not in RUN_STATES:
            raise FlowcraftError(f"unknown status {status!r}; use one of {', '.join(RUN_STATES)}")
        if not 1 <= limit <= 1000:
            raise FlowcraftError(f"limit must be between 1 and 1000, not {limit}")
        since_text = since.isoformat() if isinstance(since, datetime) else since
        adapter = await self._open()
        page: RunPage = await adapter.list_statuses(
            [status] if status else list(RUN_STATES), blueprint_id=blueprint_id,
            since=since_text, limit=limit, cursor=cursor)
        return page

    async def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        """Cancel a running or awaiting run: its queued jobs are dropped, a node that
        finishes routes nowhere, running nodes see ``ctx.signal`` set at their next lease
        renewal. Returns ``False`` when the run had already finished (it is left as is)."""
        adapter = await self._open()
        record, data = await self._load(run_id)
        if _effective_status(record, data) in FINAL_STATUSES:
            return False
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            return False
        await adapter.create_context(run_id).apply([PatchOperation(
            "set", RUN_STATE_KEY, {"status": "cancelled", "reason": reason})])
        fields = {"status": "cancelled", "finalStatus": "cancelled", "lastUpdated": now_iso(),
                  "reason": reason}
        statuses = adapter.backend.statuses
        written = await statuses.write(run_id, fields, only_if_running=True)
        if not written and (await statuses.read(run_id) or {}).get("status") == "awaiting":
            await statuses.write(run_id, fields, only_if_running=False)
        return True

    async def resume(self, run_id: str, node_id: str, action: str | None = None,
                     data: Any = None) -> list[str]:
        """Complete the awaiting ``wait`` node ``node_id`` with output ``data``; ``action``
        routes from it. Returns the node ids resumed."""
        adapter = await self._open()
        record, stored = await self._load(run_id)
        if _effective_status(record, stored) in FINAL_STATUSES:
            raise FlowcraftError(f"cannot resume run '{run_id}': it is "
                                 f"{_effective_status(record, stored)}", run_id=run_id)
        self._need_blueprint(record.get("blueprintId") or stored.get(BLUEPRINT_KEY))
        return list(await adapter.resume_with_action(run_id, action, data, node_id))

    async def reconcile(self, run_id: str) -> list[str]:
        """Re-enqueue the run's ready nodes (after lost messages); returns their ids."""
        adapter = await self._open()
        record, stored = await self._load(run_id)
        self._need_blueprint(record.get("blueprintId") or stored.get(BLUEPRINT_KEY))
        return list(await adapter.reconcile(run_id))

    def _need_blueprint(self, blueprint_id: str | None) -> None:
        if blueprint_id and blueprint_id not in self.blueprints:
            known = ", ".join(sorted(self.blueprints)) or "none"
            raise FlowcraftError(f"blueprint '{blueprint_id}' is not known to this client "
                                 f"(known: {known}); pass blueprints= with it")


def _options(blueprints: dict[str, WorkflowBlueprint]) -> RuntimeOptions:
    return RuntimeOptions(dict(blueprints), {}, {})


def _blueprints(value: Any) -> dict[str, WorkflowBlueprint]:
    if value is None:
        return {}
    if isinstance(value, str | Path):
        return dict(load_blueprints(value))
    if isinstance(value, Mapping):
        return {k: v if isinstance(v, WorkflowBlueprint) else WorkflowBlueprint.model_validate(v)
                for k, v in value.items()}
    result = {}
    for item in value:
        bp = item if isinstance(item, WorkflowBlueprint) else WorkflowBlueprint.model_validate(
            item)
        result[bp.id] = bp
    return result


class SyncClient:
    """:class:`Client` for scripts: the same methods, blocking, on a private event loop.
    ``with SyncClient.from_env("aws", blueprints="blueprints") as client: ...``"""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._runner = asyncio.Runner()

    @classmethod
    def from_env(cls, cloud: Literal["aws", "azure"], **options: Any) -> SyncClient:
        return cls(Client.from_env(cloud, **options))

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._runner.run(self.client.close())
        self._runner.close()

    def start(self, blueprint_id: str, context: Mapping[str, Any] | None = None,
              run_id: str | None = None) -> str:
        return self._runner.run(self.client.start(blueprint_id, context, run_id))

    def status(self, run_id: str) -> RunStatus:
        return self._runner.run(self.client.status(run_id))

    def result(self, run_id: str, timeout: float = 60.0) -> RunResult:
        return self._runner.run(self.client.result(run_id, timeout))

    def list_runs(self, status: str | None = None, blueprint_id: str | None = None,
                  since: datetime | str | None = None, limit: int = 50,
                  cursor: str | None = None) -> RunPage:
        return self._runner.run(self.client.list_runs(status, blueprint_id, since, limit,
                                                      cursor))

    def cancel(self, run_id: str, reason: str = "cancelled") -> bool:
        return self._runner.run(self.client.cancel(run_id, reason))

    def resume(self, run_id: str, node_id: str, action: str | None = None,
               data: Any = None) -> list[str]:
        return self._runner.run(self.client.resume(run_id, node_id, action, data))

    def reconcile(self, run_id: str) -> list[str]:
        return self._runner.run(self.client.reconcile(run_id))
