"""Where the run view gets runs from: a small protocol, and its implementation over an adapter.

:class:`RunSource` is all the web view needs — list, read, cancel, resume. The
:class:`AdapterRunSource` speaks to any distributed adapter (AWS, Azure, in-process)
through its public methods, plus its status scan for listing (a table scan for now: fine
for a few thousand runs; an index can replace it without touching the web view).
Everything it shows goes through :mod:`flowcraft.runview`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..blueprint import WorkflowBlueprint
from ..context import PatchOperation
from ..runview import RUN_STATUSES, RunSummary, RunView, parse_time, run_summary, run_view

MAX_PAGE_SIZE = 200


@dataclass(frozen=True, slots=True)
class RunPage:
    runs: list[RunSummary]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [r.to_dict() for r in self.runs], "nextCursor": self.next_cursor}


class RunSource(Protocol):
    async def list_runs(self, status: str | None = None, blueprint_id: str | None = None,
                        limit: int = 50, cursor: str | None = None) -> RunPage: ...

    async def get_run(self, run_id: str) -> RunView | None: ...

    async def cancel(self, run_id: str, reason: str) -> bool: ...

    async def resume(self, run_id: str, node_id: str | None, action: str | None,
                     data: Any) -> list[str]: ...


class BadRequest(ValueError):
    """A caller's mistake (an unknown status, a malformed cursor): the message says which."""


async def cancel_run(adapter: Any, run_id: str, reason: str) -> bool:
    """Cancel a run that is ``running`` (or ``awaiting``); return whether it was cancelled.

    Two writes: the status record becomes ``cancelled`` — only while it is ``running``, so
    a run that completed or failed meanwhile keeps its outcome — then the run state in the
    context (``{"status": "cancelled", "reason": ...}``), which makes every worker drop the
    run's remaining jobs (a node already running finishes, its successors do not start).
    An ``awaiting`` run has no worker racing it, so its status is overwritten after a read.
    """
    from ..distributed.backend import now_iso
    from ..distributed.context import RUN_STATE_KEY

    fields = {"status": "cancelled", "finalStatus": "cancelled", "lastUpdated": now_iso(),
              "error": f"cancelled: {reason}", "cancelReason": reason}
    statuses = adapter.backend.statuses
    written = await statuses.write(run_id, fields, only_if_running=True)
    if not written:
        current = await adapter.get_run_status(run_id)
        if not current or current.get("status") != "awaiting":
            return False
        written = await statuses.write(run_id, fields, only_if_running=False)
    await adapter.create_context(run_id).apply([
        PatchOperation("set", RUN_STATE_KEY, {"status": "cancelled", "reason": reason})])
    return bool(written)


class AdapterRunSource:
    """Runs of a distributed adapter; ``blueprints`` (default: the adapter's) draw graphs."""

    def __init__(self, adapter: Any,
                 blueprints: Mapping[str, WorkflowBlueprint] | None = None) -> None:
        self.adapter = adapter
        self.blueprints = dict(blueprints if blueprints is not None
                               else adapter.runtime_options.blueprints)

    async def list_runs(self, status: str | None = None, blueprint_id: str | None = None,
                        limit: int = 50, cursor: str | None = None) -> RunPage:
        if status and status not in RUN_STATUSES:
            raise BadRequest(f"unknown status '{status}' (one of: {', '.join(RUN_STATUSES)})")
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE_SIZE}, not {limit}")
        lister = getattr(self.adapter, "list_statuses", None)
        if lister is not None:  # the status index, as the Client lists runs
            statuses = [status] if status else list(RUN_STATUSES)
            indexed = await lister(statuses, blueprint_id=blueprint_id, limit=limit,
                                   cursor=cursor)
            return RunPage([run_summary({"runId": s.run_id, **s.record}) for s in indexed.items],
                           indexed.next_cursor)
        offset = _offset(cursor)  # a backend without an index: read every status record
        records: list[dict[str, Any]] = []
        for wanted in [status] if status else RUN_STATUSES:
            async for record in self.adapter.backend.statuses.scan(wanted):
                if blueprint_id and record.get("blueprintId") != blueprint_id:
                    continue
                records.append(record)
        # Newest activity first; the run id breaks ties so pages never overlap.
        records.sort(key=lambda r: (-(parse_time(r.get("lastUpdated")) or 0.0),
                                    str(r.get("runId"))))
        page = records[offset:offset + limit]
        more = offset + limit < len(records)
        return RunPage([run_summary(r) for r in page], str(offset + limit) if more else None)

    async def get_run(self, run_id: str) -> RunView | None:
        status = await self.adapter.get_run_status(run_id)
        data = await self.adapter.create_context(run_id).load()
        if status is None and data is None:
            return None
        blueprint = self.blueprints.get((status or {}).get("blueprintId") or "")
        return run_view(blueprint, data, status, run_id=run_id)

    async def cancel(self, run_id: str, reason: str) -> bool:
        return await cancel_run(self.adapter, run_id, reason)

    async def resume(self, run_id: str, node_id: str | None, action: str | None,
                     data: Any) -> list[str]:
        return list(await self.adapter.resume_with_action(run_id, action=action, output=data,
                                                          node_id=node_id))


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    if not cursor.isdigit():
        raise BadRequest(f"malformed cursor '{cursor}': pass back the nextCursor of a page")
    return int(cursor)
