"""The webhook built-in and its ASGI app: in memory, and resuming a run on AWS (moto)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

import aws_helpers
import azure_helpers
from distributed_helpers import Executions
from flowcraft import Flow, FlowRuntime, WorkflowBlueprint
from flowcraft.webhook import DistributedWebhookRuns, InMemoryWebhookRuns, webhook_app


async def call(app: Any, method: str, path: str, body: bytes = b"", *,
               content_type: str = "application/json", query: str = "",
               root_path: str = "") -> tuple[int, dict[str, Any]]:
    """One request to an ASGI app, as a server would make it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": root_path + path,
             "raw_path": (root_path + path).encode(), "root_path": root_path,
             "query_string": query.encode(),
             "headers": [(b"content-type", content_type.encode())]}
    chunks = [body[:3], body[3:]]  # the body in two messages, as servers may send it
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def approval() -> Flow:
    return (Flow("hook").node("ask", lambda ctx: {"amount": 120})
            .node("cb", "webhook", params={"baseUrl": "https://example.test/hooks/"})
            .node("done", lambda ctx: {"got": ctx.input})
            .edge("ask", "cb").edge("cb", "done"))


async def parked_in_memory() -> tuple[InMemoryWebhookRuns, Any, str]:
    flow = approval()
    runtime = FlowRuntime(registry=flow.registry())
    runs = InMemoryWebhookRuns(runtime, flow.to_blueprint())
    parked = runs.track(await runtime.run(flow.to_blueprint(), run_id="run-1"))
    assert parked.status == "awaiting"
    details = parked.context["_awaitingDetails"]["cb"]
    return runs, webhook_app(resume=runs), details["url"]


async def test_webhook_node_parks_with_an_unguessable_url() -> None:
    runs, _, url = await parked_in_memory()
    details = runs.results["run-1"].context["_awaitingDetails"]["cb"]
    assert details["reason"] == "webhook" and details["method"] == "POST"
    assert len(details["token"]) >= 40
    assert url == f"https://example.test/hooks/run-1/cb/{details['token']}"
    other, _, _ = await parked_in_memory()
    assert other.results["run-1"].context["_awaitingDetails"]["cb"]["token"] != details["token"]


async def test_a_post_resumes_the_run_with_its_body_once() -> None:
    runs, app, url = await parked_in_memory()
    path = urlsplit(url).path.removeprefix("/hooks")
    status, answer = await call(app, "POST", path, b'{"approved": true}')
    assert (status, answer) == (200, {"runId": "run-1", "nodeId": "cb", "status": "completed"})
    result = runs.results["run-1"]
    assert result.context["_outputs.cb"] == {"approved": True}
    assert result.context["_outputs.done"] == {"got": {"approved": True}}
    status, answer = await call(app, "POST", path, b'{"approved": false}')
    assert status == 404 and "awaiting" in answer["error"]
    assert runs.results["run-1"].context["_outputs.cb"] == {"approved": True}


async def test_concurrent_posts_resume_once() -> None:
    runs, app, url = await parked_in_memory()
    path = urlsplit(url).path
    answers = await asyncio.gather(*(call(app, "POST", path, json.dumps(i).encode())
                                     for i in range(5)))
    statuses = [status for status, _ in answers]
    assert statuses.count(200) == 1
    assert set(statuses) - {200} <= {404, 409}  # not awaiting (any more)
    winner = statuses.index(200)
    assert runs.results["run-1"].status == "completed"
    assert runs.results["run-1"].context["_outputs.cb"] == winner


async def test_wrong_token_method_body_and_paths_are_refused() -> None:
    runs, app, url = await parked_in_memory()
    path = urlsplit(url).path
    token = path.rsplit("/", 1)[1]
    wrong = path[: -len(token)] + token[:-1] + ("A" if token[-1] != "A" else "B")
    assert (await call(app, "POST", wrong, b"{}"))[0] == 403
    status, _ = await call(app, "GET", path)
    assert status == 405
    assert (await call(app, "POST", path, b"{not json"))[0] == 400
    assert (await call(app, "POST", "/run-1/ask/" + token, b"{}"))[0] == 404
    assert (await call(app, "POST", "/nope/cb/" + token, b"{}"))[0] == 404
    assert (await call(app, "POST", "/short", b"{}"))[0] == 404
    big = webhook_app(resume=runs, max_body_bytes=10)
    assert (await call(big, "POST", path, b'{"x": "0123456789"}'))[0] == 413
    assert runs.results["run-1"].status == "awaiting"  # nothing was resumed


async def test_text_body_action_and_mounting_under_a_prefix() -> None:
    flow = (Flow("routed").node("cb", "webhook").node("yes", lambda ctx: "yes")
            .node("no", lambda ctx: "no")
            .edge("cb", "yes", action="approve").edge("cb", "no", action="deny"))
    runtime = FlowRuntime(registry=flow.registry())
    bp = flow.to_blueprint()
    runs = InMemoryWebhookRuns(runtime, bp)
    parked = runs.track(await runtime.run(bp, run_id="parent/child"))
    details = parked.context["_awaitingDetails"]["cb"]
    assert details["url"].startswith("/parent%2Fchild/cb/")  # no base URL: a relative one
    app = webhook_app(resume=runs)
    status, _ = await call(app, "POST", details["url"], b"looks good",
                           content_type="text/plain; charset=utf-8", query="action=approve",
                           root_path="/mounted/hooks")
    assert status == 200
    result = runs.results["parent/child"]
    assert result.context["_outputs.cb"] == "looks good"
    assert result.context["_outputs.yes"] == "yes" and "_outputs.no" not in result.context


async def test_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_WEBHOOK_BASE_URL", "https://env.test/h")
    flow = Flow("env").node("cb", "webhook")
    result = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint(), run_id="e")
    token = result.context["_awaitingDetails"]["cb"]["token"]
    assert result.context["_awaitingDetails"]["cb"]["url"] == f"https://env.test/h/e/cb/{quote(token)}"


async def resume_a_distributed_run(started: Any) -> None:
    """Park a run on real services, resume it through the app, check it ran once."""
    runs = Executions()
    flow = (Flow("cloud-hook").node("ask", runs.node(lambda ctx: {"amount": 120}))
            .node("cb", "webhook")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .edge("ask", "cb").edge("cb", "pay"))
    bp: WorkflowBlueprint = flow.to_blueprint()
    async with started([bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        parked = await worker.wait_for_result(run_id, timeout=20)
        assert parked.status == "awaiting", parked.errors
        url = parked.context["_awaitingDetails"]["cb"]["url"]
        app = webhook_app(resume=DistributedWebhookRuns(worker))
        token = url.rsplit("/", 1)[1]
        assert (await call(app, "POST", url[: -len(token)] + "x" * len(token), b"{}"))[0] == 403
        status, answer = await call(app, "POST", url, b'{"by": "ada"}')
        assert status == 200 and answer["resumed"] == ["cb"]
        result = await worker.wait_for_result(run_id, timeout=20)
        assert (await call(app, "POST", url, b'{"by": "eve"}'))[0] == 404
    assert result.status == "completed", result.errors
    assert result.context["_outputs.cb"] == {"by": "ada"}
    assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}
    assert runs.counts == {"ask": 1, "pay": 1}


@pytest.mark.integration
async def test_a_post_resumes_a_distributed_run_on_aws(aws: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    aws_helpers.make_moto_dynamodb_atomic(monkeypatch)  # moto loses concurrent updates
    await resume_a_distributed_run(lambda bps, registry: aws_helpers.workers(aws, bps, registry))


@pytest.mark.integration
async def test_a_post_resumes_a_distributed_run_on_azure(azure: Any) -> None:
    await resume_a_distributed_run(
        lambda bps, registry: azure_helpers.workers(azure, bps, registry))
