"""The web view: a JSON API over a :class:`~flowcraft.ui.source.RunSource` and one page app.

Routes::

    GET  /                            the runs page        GET /runs/{id}  a run's page
    GET  /assets/{file}               the page's script and style (package data, no CDN)
    GET  /api/config                  {"allowActions": bool}
    GET  /api/runs?status=&blueprint=&limit=&cursor=
    GET  /api/runs/{id}               the run view (flowcraft.runview.RunView.to_dict())
    GET  /api/runs/{id}/events        server-sent events: the run view whenever it changes
    POST /api/runs/{id}/cancel        {"reason": "..."}                     (--allow-actions)
    POST /api/runs/{id}/resume        {"nodeId": ..., "action": ..., "data": ...}

Read-only unless ``allow_actions``: the POST routes answer 403 then. They also only take
``application/json`` from the page's own origin, so another site open in the same browser
cannot post a form to them. aiohttp serves it (the Azure extra already depends on it, so
the view adds no dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import FlowcraftError
from .source import MAX_PAGE_SIZE, AdapterRunSource, BadRequest, RunSource

ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
               ".svg": "image/svg+xml"}
logger = logging.getLogger(__name__)

SOURCE_KEY = web.AppKey("source", RunSource)
SETTINGS_KEY = web.AppKey("settings", dict)
STOPPING_KEY = web.AppKey("stopping", asyncio.Event)


WEBHOOK_PREFIX = "/webhooks"
"""Where the view serves ``webhook`` nodes' URLs (``<prefix>/<run id>/<node id>/<token>``)."""


def create_app(source: RunSource, *, allow_actions: bool = False,
               poll_seconds: float = 1.0, webhooks: Any = None) -> web.Application:
    """The web view over ``source``; SSE streams re-read a run every ``poll_seconds``.

    ``webhooks`` (a :class:`~flowcraft.webhook.WebhookRuns`) also serves the URLs of
    ``webhook`` nodes under ``/webhooks/``: a POST resumes the node with its body. They are
    protected by each node's token, not by ``allow_actions``."""
    app = web.Application(middlewares=[_errors])
    if webhooks is not None:
        from ..webhook import webhook_app

        bridge = _asgi_handler(webhook_app(resume=webhooks), WEBHOOK_PREFIX)
        app.router.add_route("*", WEBHOOK_PREFIX + "/{tail:.*}", bridge)
    app[SOURCE_KEY] = source
    app[SETTINGS_KEY] = {"allow_actions": allow_actions, "poll_seconds": poll_seconds}
    app[STOPPING_KEY] = asyncio.Event()
    app.on_shutdown.append(_stopping)
    app.router.add_get("/", _page)
    app.router.add_get("/runs/{run_id}", _page)
    app.router.add_get("/assets/{name}", _asset)
    app.router.add_get("/api/config", _config)
    app.router.add_get("/api/runs", _list_runs)
    app.router.add_get("/api/runs/{run_id}", _get_run)
    app.router.add_get("/api/runs/{run_id}/events", _events)
    app.router.add_post("/api/runs/{run_id}/cancel", _cancel)
    app.router.add_post("/api/runs/{run_id}/resume", _resume)
    return app


def _asgi_handler(asgi_app: Any, prefix: str) -> Any:
    """An aiohttp handler running an ASGI app mounted at ``prefix`` (one request, buffered)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        raw_path = request.raw_path.split("?", 1)[0]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": request.method, "scheme": request.scheme,
            "path": request.path, "raw_path": raw_path.encode("latin-1"),
            "root_path": prefix, "query_string": request.query_string.encode("latin-1"),
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in request.headers.items()],
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        answer: dict[str, Any] = {"status": 500, "headers": [], "body": b""}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = message.get("headers", [])
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await asgi_app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in answer["headers"]
                   if k.lower() != b"content-length"}
        return web.Response(status=answer["status"], body=answer["body"], headers=headers)

    return handler


async def serve(source: RunSource, *, host: str = "127.0.0.1", port: int = 8080,
                allow_actions: bool = False, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, webhooks: Any = None) -> None:
    """Serve until ``stop`` is set (or forever); ``ready`` is set once listening."""
    runner = web.AppRunner(create_app(source, allow_actions=allow_actions, webhooks=webhooks))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=lambda v: json.dumps(v, default=str))


def _problem(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BadRequest as exc:
        return _problem(400, str(exc))
    except FlowcraftError as exc:
        return _problem(409, str(exc))


async def _stopping(app: web.Application) -> None:
    # Event streams never end on their own: without this, shutting down waits out their
    # connections (a minute) before the server stops.
    app[STOPPING_KEY].set()


async def _page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(ASSETS / "index.html", headers={"Cache-Control": "no-cache"})


async def _asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = ASSETS / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise web.HTTPNotFound(text=f"no asset '{name}'")
    return web.FileResponse(path, headers={
        "Content-Type": ASSET_TYPES.get(path.suffix, "application/octet-stream"),
        "Cache-Control": "no-cache"})


async def _config(request: web.Request) -> web.Response:
    return _json({"allowActions": request.app[SETTINGS_KEY]["allow_actions"]})


async def _list_runs(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = int(query.get("limit") or 50)
    except ValueError:
        raise BadRequest(f"limit must be a number between 1 and {MAX_PAGE_SIZE}") from None
    page = await request.app[SOURCE_KEY].list_runs(
        status=query.get("status") or None, blueprint_id=query.get("blueprint") or None,
        limit=limit, cursor=query.get("cursor") or None)
    return _json(page.to_dict())


async def _get_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    view = await request.app[SOURCE_KEY].get_run(run_id)
    if view is None:
        return _problem(404, f"no run '{run_id}' in the status or context store")
    return _json(view.to_dict())


async def _events(request: web.Request) -> web.StreamResponse:
    """The run view as an SSE ``run`` event each time it changes; a comment line every
    15 s keeps proxies from closing a quiet stream. The browser reconnects on its own."""
    run_id = request.match_info["run_id"]
    source = request.app[SOURCE_KEY]
    poll = request.app[SETTINGS_KEY]["poll_seconds"]
    stopping = request.app[STOPPING_KEY]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    last = None
    quiet = 0.0
    try:
        while not stopping.is_set():
            view = await source.get_run(run_id)
            text = json.dumps(view.to_dict() if view else None, default=str)
            if text != last:
                await response.write(f"event: run\ndata: {text}\n\n".encode())
                last, quiet = text, 0.0
            elif quiet >= 15:
                await response.write(b": still here\n\n")
                quiet = 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), poll)
            quiet += poll
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return response


async def _action_body(request: web.Request) -> dict[str, Any]:
    if not request.app[SETTINGS_KEY]["allow_actions"]:
        raise web.HTTPForbidden(
            text=json.dumps({"error": "actions are disabled: start the view with "
                                      "--allow-actions to cancel or resume runs"}),
            content_type="application/json")
    origin = request.headers.get("Origin")
    if origin and origin != f"{request.scheme}://{request.host}":
        raise web.HTTPForbidden(
            text=json.dumps({"error": f"cross-origin request from {origin} refused"}),
            content_type="application/json")
    if request.content_type != "application/json":
        raise BadRequest("send the action as application/json")
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _cancel(request: web.Request) -> web.Response:
    body = await _action_body(request)
    run_id = request.match_info["run_id"]
    reason = str(body.get("reason") or "cancelled from the run view")
    if not await request.app[SOURCE_KEY].cancel(run_id, reason):
        return _problem(409, f"run '{run_id}' is not running (nothing to cancel)")
    logger.info("run %s cancelled from the run view: %s", run_id, reason)
    return _json({"cancelled": True, "runId": run_id})


async def _resume(request: web.Request) -> web.Response:
    body = await _action_body(request)
    run_id = request.match_info["run_id"]
    enqueued = await request.app[SOURCE_KEY].resume(
        run_id, body.get("nodeId") or None, body.get("action") or None, body.get("data"))
    logger.info("run %s resumed from the run view (node %s, action %s)", run_id,
                body.get("nodeId"), body.get("action"))
    return _json({"resumed": True, "runId": run_id, "enqueued": enqueued})


def run_server(open_adapter: Callable[[], Any], *, host: str = "127.0.0.1", port: int = 8080,
               allow_actions: bool = False) -> int:
    """``flowcraft ui``: serve the view over the adapter ``open_adapter()`` returns (an async
    context manager) until interrupted."""

    async def main() -> None:
        async with open_adapter() as adapter:
            mode = "cancel and resume allowed" if allow_actions else "read-only"
            print(f"flowcraft ui: http://{host}:{port}/ ({mode}); Ctrl-C stops it", flush=True)
            if allow_actions and host not in ("127.0.0.1", "localhost", "::1"):
                print(f"flowcraft ui: warning: anyone who can reach {host}:{port} can cancel "
                      "and resume runs; put it behind authentication", flush=True)
            from ..webhook import DistributedWebhookRuns

            await serve(AdapterRunSource(adapter), host=host, port=port,
                        allow_actions=allow_actions, webhooks=DistributedWebhookRuns(adapter))

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
