"""The ``webhook`` node's endpoint: a small ASGI app that resumes parked runs on POST.

A node with ``uses: "webhook"`` parks like ``wait`` and records, in its awaiting
details (``_awaitingDetails[<node id>]``), a fresh token and its URL::

    {"reason": "webhook", "url": "<base>/<run id>/<node id>/<token>", "token": ..., ...}

``<base>`` is the node's ``baseUrl`` param, else ``FLOWCRAFT_WEBHOOK_BASE_URL``. A POST
to that URL resumes the node with the request body as its output (JSON, or text for a
``text/*`` body; an empty body is ``null``); ``?action=<name>`` routes from it as
``resume_with_action`` would. The token is compared in constant time; a wrong one is
refused (403) and a node that is not awaiting is not found (404).

:func:`webhook_app` has no framework dependency: mount it in any ASGI app (Starlette's
``Mount("/hooks", app=...)``, FastAPI's ``app.mount``) or serve it alone. It finds and
resumes runs through a :class:`WebhookRuns`:

* :class:`InMemoryWebhookRuns` - runs of a :class:`~flowcraft.FlowRuntime` whose
  saved state it keeps (``runs.track(result)``);
* :class:`DistributedWebhookRuns` - runs of a distributed adapter (AWS or Azure),
  resumed with ``resume_with_action``.

The request waits for the resume: in memory, the run continues until it rests again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

from .core.routing import AWAITING_DETAILS_KEY, AWAITING_IDS_KEY
from .errors import FlowcraftError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024


class WebhookRuns(Protocol):
    """How the app reaches runs: read a node's awaiting details, resume it."""

    async def details(self, run_id: str, node_id: str) -> Mapping[str, Any] | None:
        """The node's awaiting details, or ``None`` if the run or the parked node is unknown."""
        ...

    async def resume(self, run_id: str, node_id: str, token: str, output: Any,
                     action: str | None) -> Mapping[str, Any]:
        """Resume the node; what to answer (JSON). Raise ``FlowcraftError`` if it cannot."""
        ...


def token_matches(details: Mapping[str, Any] | None, token: str) -> bool:
    expected = (details or {}).get("token")
    if (details or {}).get("reason") != "webhook" or not isinstance(expected, str):
        return False
    return hmac.compare_digest(expected.encode(), token.encode())


def _awaiting_details(data: Mapping[str, Any], node_id: str) -> Mapping[str, Any] | None:
    if node_id not in (data.get(AWAITING_IDS_KEY) or []):
        return None
    details = (data.get(AWAITING_DETAILS_KEY) or {}).get(node_id)
    return details if isinstance(details, Mapping) else None


class InMemoryWebhookRuns:
    """Parked runs of a ``FlowRuntime``: ``track`` each result; a POST resumes the run
    from its saved state and tracks the new result (``runs.results[run_id]``)."""

    def __init__(self, runtime: Any, blueprint: Any) -> None:
        self.runtime = runtime
        self.blueprint = blueprint
        self.results: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def track(self, result: Any) -> Any:
        """Remember a run's result (``WorkflowResult``); returns it."""
        self.results[result.run_id] = result
        return result

    async def details(self, run_id: str, node_id: str) -> Mapping[str, Any] | None:
        result = self.results.get(run_id)
        if result is None:
            return None
        return _awaiting_details(json.loads(result.serialized_context), node_id)

    async def resume(self, run_id: str, node_id: str, token: str, output: Any,
                     action: str | None) -> Mapping[str, Any]:
        lock = self._locks.setdefault(run_id, asyncio.Lock())
        async with lock:  # one resume at a time: a second POST finds the node resumed
            if not token_matches(await self.details(run_id, node_id), token):
                raise FlowcraftError(f"node '{node_id}' of run '{run_id}' is no longer "
                                     "awaiting this webhook", run_id=run_id, node_id=node_id)
            resume_data: dict[str, Any] = {"output": output}
            if action is not None:
                resume_data["action"] = action
            state = self.results[run_id].serialized_context
            result = await self.runtime.resume(self.blueprint, state, resume_data, node_id,
                                               run_id=run_id)
            self.track(result)
        return {"runId": run_id, "nodeId": node_id, "status": result.status}


class DistributedWebhookRuns:
    """Parked runs of a distributed adapter: details from the stored context, resumed with
    ``adapter.resume_with_action`` (whose claim lets only one POST win)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    async def details(self, run_id: str, node_id: str) -> Mapping[str, Any] | None:
        data = await self.adapter.create_context(run_id).load()
        return None if data is None else _awaiting_details(data, node_id)

    async def resume(self, run_id: str, node_id: str, token: str, output: Any,
                     action: str | None) -> Mapping[str, Any]:
        enqueued = await self.adapter.resume_with_action(run_id, action, output, node_id)
        return {"runId": run_id, "nodeId": node_id, "status": "running",
                "resumed": list(enqueued)}


def webhook_app(*, resume: WebhookRuns,
                max_body_bytes: int = MAX_BODY_BYTES) -> Callable[[Scope, Receive, Send],
                                                                  Awaitable[None]]:
    """An ASGI app serving ``POST /<run id>/<node id>/<token>`` (relative to its mount)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        parts = _path_parts(scope)
        if parts is None:
            await _answer(send, 404, {"error": "not found: POST to <run id>/<node id>/<token>"})
            return
        if scope.get("method") != "POST":
            await _answer(send, 405, {"error": "use POST to resume a webhook node"},
                          [(b"allow", b"POST")])
            return
        run_id, node_id, token = parts
        body = await _read_body(receive, max_body_bytes)
        if body is None:
            await _answer(send, 413, {"error": f"the body is larger than {max_body_bytes} "
                                               "bytes"})
            return
        details = await resume.details(run_id, node_id)
        if details is None or details.get("reason") != "webhook":
            await _answer(send, 404, {"error": f"run '{run_id}' has no node '{node_id}' "
                                               "awaiting a webhook"})
            return
        if not token_matches(details, token):
            await _answer(send, 403, {"error": "wrong token for this webhook"})
            return
        try:
            output = _parse_body(body, _header(scope, b"content-type"))
        except ValueError as exc:
            await _answer(send, 400, {"error": str(exc)})
            return
        query = parse_qs((scope.get("query_string") or b"").decode("latin-1"))
        action = query["action"][0] if query.get("action") else None
        try:
            answer = await resume.resume(run_id, node_id, token, output, action)
        except FlowcraftError as exc:
            await _answer(send, 409, {"error": exc.message})
            return
        await _answer(send, 200, dict(answer))

    return app


def _path_parts(scope: Scope) -> tuple[str, str, str] | None:
    raw = scope.get("raw_path")
    # The raw path keeps %2F inside a run id (a subflow's "parent/node") as one segment.
    path = raw.decode("latin-1") if isinstance(raw, bytes) else scope.get("path", "")
    parts = [p for p in path.split("?")[0].split("/") if p]
    if len(parts) < 3:
        return None
    run_id, node_id, token = (unquote(p) for p in parts[-3:])
    return run_id, node_id, token


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body.strip():
        return None
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith("text/"):
        return body.decode("utf-8", errors="replace")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the body is not valid JSON ({exc}); send JSON, or text with a "
                         "text/* content type") from None


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _answer(send: Send, status: int, body: Mapping[str, Any],
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body, default=str).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
