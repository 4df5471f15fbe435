"""The run view (``flowcraft ui``): its JSON API over the in-process backend, then the page
in a real Chromium against runs on the local AWS stack (moto) with workers in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aws_helpers import make_adapter, make_moto_dynamodb_atomic, workers
from flowcraft import Flow, FlowRuntime, NodeContext, NodeResult
from flowcraft.distributed.inprocess import InProcessAdapter
from flowcraft.ui import AdapterRunSource, cancel_run
from flowcraft.ui.app import create_app


def slow(seconds: float, output: Any = None) -> Any:
    async def node(ctx: NodeContext) -> Any:
        await asyncio.sleep(seconds)
        return output if output is not None else ctx.input
    return node


async def boom(ctx: NodeContext) -> Any:
    raise ValueError("card declined")


def shop(delay: float = 0.0, flow_id: str = "shop") -> Flow:
    return (Flow(flow_id).node("fetch", slow(delay, {"total": 12}))
            .node("check", slow(delay)).node("ship", slow(delay))
            .edge("fetch", "check").edge("check", "ship"))


@pytest.fixture
async def worker() -> AsyncIterator[InProcessAdapter]:
    flows = [shop(), shop(0.4, "slow"),
             Flow("broken").node("a", slow(0, 1)).node("b", boom).edge("a", "b"),
             Flow("gated").node("a", slow(0, 1)).wait("approve").node("done", slow(0))
             .edge("a", "approve").edge("approve", "done", action="yes")]
    registry = {k: v for flow in flows for k, v in flow.registry().items()}
    runtime = FlowRuntime(blueprints={f.id: f.to_blueprint() for f in flows}, registry=registry)
    adapter = InProcessAdapter(runtime.options, poll_wait_seconds=0.05, lease_seconds=5)
    await adapter.start()
    try:
        yield adapter
    finally:
        await adapter.stop(timeout_seconds=5)


async def client_for(adapter: Any, **options: Any) -> TestClient:
    client = TestClient(TestServer(create_app(AdapterRunSource(adapter), **options)))
    await client.start_server()
    return client


async def test_runs_are_listed_filtered_and_paged(worker: InProcessAdapter) -> None:
    ids = [await worker.start_workflow("shop", {}, run_id=f"shop-{i}") for i in range(5)]
    broken = await worker.start_workflow("broken", {}, run_id="broken-1")
    for run_id in [*ids, broken]:
        await worker.wait_for_result(run_id, timeout=10)
    client = await client_for(worker)
    try:
        everything = await (await client.get("/api/runs")).json()
        assert {r["run_id"] for r in everything["runs"]} == {*ids, broken}
        assert everything["nextCursor"] is None
        failed = await (await client.get("/api/runs?status=failed")).json()
        assert [(r["run_id"], r["status"]) for r in failed["runs"]] == [("broken-1", "failed")]
        shops = await (await client.get("/api/runs?blueprint=shop")).json()
        assert {r["blueprint_id"] for r in shops["runs"]} == {"shop"}
        seen: list[str] = []
        cursor = ""
        while True:
            page = await (await client.get(f"/api/runs?limit=2&cursor={cursor}")).json()
            assert len(page["runs"]) <= 2
            seen += [r["run_id"] for r in page["runs"]]
            if not page["nextCursor"]:
                break
            cursor = page["nextCursor"]
        assert sorted(seen) == sorted([*ids, broken])  # every run once, across the pages
        for bad in ("status=lost", "limit=0", "limit=x", "cursor=abc"):
            response = await client.get(f"/api/runs?{bad}")
            assert response.status == 400, bad
            assert (await response.json())["error"]
    finally:
        await client.close()


async def test_a_run_shows_its_nodes_graph_and_failure(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("broken", {})
    await worker.wait_for_result(run_id, timeout=10)
    client = await client_for(worker)
    try:
        view = await (await client.get(f"/api/runs/{run_id}")).json()
        assert view["status"] == "failed"
        assert view["blueprintId"] == "broken"
        assert view["nodes"]["a"]["state"] == "done"
        assert view["nodes"]["b"]["state"] == "failed"
        assert "card declined" in view["nodes"]["b"]["error"]
        assert any("card declined" in e for e in view["errors"])
        assert [(e["source"], e["target"]) for e in view["graph"]["edges"]] == [("a", "b")]
        missing = await client.get("/api/runs/nope")
        assert missing.status == 404
        assert "nope" in (await missing.json())["error"]
    finally:
        await client.close()


async def test_actions_are_refused_unless_allowed(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    client = await client_for(worker)
    try:
        for action in ("cancel", "resume"):
            response = await client.post(f"/api/runs/{run_id}/{action}", json={})
            assert response.status == 403
            assert "--allow-actions" in (await response.json())["error"]
        assert (await worker.get_run_status(run_id))["status"] == "awaiting"
    finally:
        await client.close()


async def test_resume_with_an_action_completes_an_awaiting_run(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    client = await client_for(worker, allow_actions=True)
    try:
        view = await (await client.get(f"/api/runs/{run_id}")).json()
        assert view["nodes"]["approve"]["state"] == "awaiting"
        assert view["awaitingNodeIds"] == ["approve"]
        response = await client.post(f"/api/runs/{run_id}/resume", json={
            "nodeId": "approve", "action": "yes", "data": {"by": "ada"}})
        assert response.status == 200, await response.text()
        result = await worker.wait_for_result(run_id, timeout=10)
        assert result.status == "completed"
        view = await (await client.get(f"/api/runs/{run_id}")).json()
        assert view["nodes"]["approve"]["output"] == {"by": "ada"}
        assert view["nodes"]["done"]["state"] == "done"
        again = await client.post(f"/api/runs/{run_id}/resume", json={"nodeId": "approve"})
        assert again.status == 409  # nothing awaits any more: said, not a server error
        assert "not awaiting" in (await again.json())["error"]
    finally:
        await client.close()


async def test_actions_take_only_json_from_the_pages_own_origin(
    worker: InProcessAdapter,
) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    client = await client_for(worker, allow_actions=True)
    try:
        form = await client.post(f"/api/runs/{run_id}/cancel", data={"reason": "x"})
        assert form.status == 400
        foreign = await client.post(f"/api/runs/{run_id}/cancel", json={},
                                    headers={"Origin": "http://evil.example"})
        assert foreign.status == 403
        assert (await worker.get_run_status(run_id))["status"] == "awaiting"
    finally:
        await client.close()


async def test_cancel_stops_a_running_run_and_keeps_a_finished_ones_outcome(
    worker: InProcessAdapter,
) -> None:
    run_id = await worker.start_workflow("slow", {})
    client = await client_for(worker, allow_actions=True)
    try:
        response = await client.post(f"/api/runs/{run_id}/cancel", json={"reason": "test"})
        assert response.status == 200, await response.text()
        status = await worker.get_run_status(run_id)
        assert status["status"] == "cancelled"
        assert status["cancelReason"] == "test"
        data = await worker.create_context(run_id).load()
        assert data["_flowcraft.run"] == {"status": "cancelled", "reason": "test"}
        done = await worker.start_workflow("shop", {})
        await worker.wait_for_result(done, timeout=10)
        refused = await client.post(f"/api/runs/{done}/cancel", json={})
        assert refused.status == 409
        assert (await worker.get_run_status(done))["status"] == "completed"
    finally:
        await client.close()


@pytest.mark.parametrize("local_continuation", [False, True], ids=["queued", "continued"])
async def test_cancelled_runs_jobs_are_dropped_by_workers(local_continuation: bool) -> None:
    # "continued": the worker that ran fetch goes on to check in the same job, without
    # reading the run's state from a fresh claim.
    flow = shop(delay=0.3)
    runtime = FlowRuntime(blueprints={"shop": flow.to_blueprint()}, registry=flow.registry())
    adapter = InProcessAdapter(runtime.options, poll_wait_seconds=0.05, lease_seconds=5,
                               local_continuation=local_continuation)
    await adapter.start()
    try:
        run_id = await adapter.start_workflow("shop", {})
        await asyncio.sleep(0.1)  # fetch is running
        assert await cancel_run(adapter, run_id, "enough")
        await asyncio.sleep(1.2)  # long enough for check and ship, had they run
        data = await adapter.create_context(run_id).load() or {}
        assert "_outputs.check" not in data
        assert "_outputs.ship" not in data
        assert (await adapter.get_run_status(run_id))["status"] == "cancelled"
    finally:
        await adapter.stop(timeout_seconds=5)


async def test_an_awaiting_run_can_be_cancelled(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    assert await cancel_run(worker, run_id, "declined")
    assert (await worker.get_run_status(run_id))["status"] == "cancelled"


async def test_events_stream_sends_the_run_view_as_it_changes(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    client = TestClient(TestServer(create_app(AdapterRunSource(worker), poll_seconds=0.05)))
    await client.start_server()
    try:
        response = await client.get(f"/api/runs/{run_id}/events")
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await _next_event(response)
        assert first["nodes"]["approve"]["state"] == "awaiting"
        await worker.resume_with_action(run_id, action="yes", node_id="approve")
        while True:
            view = await _next_event(response)
            if view["status"] == "completed":
                break
        assert view["nodes"]["done"]["state"] == "done"
        response.close()
    finally:
        await client.close()


async def _next_event(response: Any) -> dict[str, Any]:
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 10)).decode().rstrip("\n")
        if not line and lines:
            break
        if line:
            lines.append(line)
    assert lines[0] == "event: run"
    return json.loads(lines[1].removeprefix("data: "))


async def test_the_pages_and_their_assets_are_served(worker: InProcessAdapter) -> None:
    client = await client_for(worker)
    try:
        for path in ("/", "/runs/anything"):
            page = await client.get(path)
            assert page.status == 200
            assert "/assets/app.js" in await page.text()
        script = await client.get("/assets/app.js")
        assert script.headers["Content-Type"].startswith("text/javascript")
        assert (await client.get("/assets/style.css")).status == 200
        assert (await client.get("/assets/..%2Fapp.py")).status == 404
        assert (await client.get("/assets/missing.js")).status == 404
        assert (await (await client.get("/api/config")).json()) == {"allowActions": False}
    finally:
        await client.close()


# =============================================================================================
# The page in a real browser, on the local AWS stack
# =============================================================================================

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    assert CHROMIUM, "no chromium on PATH: run scripts/setup (it installs the system's Chromium)"
    async with async_playwright() as playwright:
        # --no-sandbox: the test machines run as root, where Chromium's sandbox cannot start.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@contextlib.asynccontextmanager
async def run_view_server(adapter: Any, **options: Any) -> AsyncIterator[str]:
    server = TestServer(create_app(AdapterRunSource(adapter), poll_seconds=0.2, **options),
                        host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/"))
    finally:
        await server.close()


def node(node_id: str, state: str | None = None) -> str:
    selector = f'svg [data-node-id="{node_id}"]'
    return selector + (f'[data-state="{state}"]' if state else "")


def approval_flow(delay: float) -> Flow:
    async def review(ctx: NodeContext) -> NodeResult:
        await asyncio.sleep(delay)
        return NodeResult(output={"score": 7}, action="approve")

    return (Flow("review").node("receive", slow(delay, {"order": 1})).node("review", review)
            .node("ship", slow(delay)).node("reject", slow(0))
            .edge("receive", "review").edge("review", "ship", action="approve")
            .edge("review", "reject", action="reject"))


@pytest.mark.integration
async def test_the_run_page_follows_a_run_from_pending_to_completed(
    aws: Any, browser: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_moto_dynamodb_atomic(monkeypatch)
    flow = approval_flow(delay=1.0)
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    async with run_view_server(client) as url:
        page = await browser.new_page()
        await page.goto(f"{url}runs/{run_id}")
        await page.wait_for_selector(node("receive", "pending"))
        seen: dict[str, list[str]] = {}
        await page.expose_function("recordState", lambda n, s: seen.setdefault(n, []).append(s))
        await page.evaluate("""() => new MutationObserver((changes) => {
            for (const c of changes) recordState(c.target.dataset.nodeId, c.target.dataset.state);
        }).observe(document.getElementById("graph"), {subtree: true,
                                                      attributeFilter: ["data-state"]})""")
        labels = await page.locator("svg .edge text").all_text_contents()
        assert sorted(labels) == ["approve", "reject"]
        async with workers(aws, [bp], flow.registry()):
            await page.wait_for_selector(node("receive", "running"), timeout=15_000)
            await page.wait_for_selector(node("review", "running"), timeout=15_000)
            await page.wait_for_selector('.summary [data-status="completed"]', timeout=20_000)
        states = {n: await page.get_attribute(node(n), "data-state")
                  for n in ("receive", "review", "ship", "reject")}
        assert states == {"receive": "done", "review": "done", "ship": "done",
                          "reject": "skipped"}
        for node_id in ("receive", "review", "ship"):
            changes = [s for s in seen.get(node_id, []) if s != "pending"]
            assert changes[:1] == ["running"] and changes[-1] == "done", (node_id, seen)
        await page.click(node("review"))
        assert json.loads(await page.text_content("#node-output")) == {"score": 7}
        assert json.loads(await page.text_content("#node-input")) == {"order": 1}
        assert await page.locator("#cancel").count() == 0  # read-only view: no actions


@pytest.mark.integration
async def test_a_failed_node_shows_its_error(aws: Any, browser: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)
    flow = Flow("payment").node("charge", boom).node("ship", slow(0)).edge("charge", "ship")
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry()) as (worker,), run_view_server(worker) as url:
        run_id = await worker.start_workflow(bp, {})
        await worker.wait_for_result(run_id, timeout=20)
        page = await browser.new_page()
        await page.goto(url)
        row = page.locator(f'tr[data-run-id="{run_id}"]')
        await row.locator('[data-status="failed"]').wait_for(timeout=10_000)
        await row.locator("a").click()
        await page.wait_for_selector(node("charge", "failed"))
        assert "card declined" in await page.text_content("#errors")
        await page.click(node("charge"))
        assert "card declined" in await page.text_content("#node-error")
        assert await page.get_attribute(node("ship"), "data-state") == "pending"


@pytest.mark.integration
async def test_cancel_from_the_page_stops_the_run(aws: Any, browser: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)
    flow = shop(delay=1.5, flow_id="long")
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry()) as (worker,), run_view_server(
        worker, allow_actions=True
    ) as url:
        run_id = await worker.start_workflow(bp, {})
        page = await browser.new_page()
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.goto(f"{url}runs/{run_id}")
        await page.wait_for_selector(node("fetch", "running"), timeout=15_000)
        await page.click("#cancel")
        await page.wait_for_selector('.summary [data-status="cancelled"]', timeout=10_000)
        await asyncio.sleep(4.5)  # check and ship would have run by now
        assert await page.get_attribute(node("ship"), "data-state") == "pending"
        status = await worker.get_run_status(run_id)
        assert status["status"] == "cancelled"
        data = await worker.create_context(run_id).load()
        assert "_outputs.ship" not in data


async def test_a_started_run_has_a_start_time_and_a_duration(worker: InProcessAdapter) -> None:
    run_id = await worker.start_workflow("shop", {})
    await worker.wait_for_result(run_id, timeout=10)
    view = await AdapterRunSource(worker).get_run(run_id)
    assert view is not None and view.started_at is not None
    assert view.duration_seconds is not None and 0 <= view.duration_seconds < 10


@pytest.mark.integration
async def test_the_ui_command_serves_the_runs_of_a_backend(aws: Any, tmp_path: Any) -> None:
    import socket
    import sys
    import urllib.request

    flow = shop(flow_id="listed")
    (tmp_path / "listed.json").write_text(json.dumps(flow.to_blueprint().to_dict()))
    client = make_adapter(aws, [flow.to_blueprint()], flow.registry())
    run_id = await client.start_workflow("listed", {})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "ui", "aws", "--port", str(port),
        "--blueprints", str(tmp_path), env=aws.environment(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        assert process.stdout is not None
        banner = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert f"http://127.0.0.1:{port}/ (read-only)" in banner

        def get(path: str) -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return json.loads(reply.read())

        for _ in range(50):
            try:
                page = await asyncio.to_thread(get, "/api/runs")
                break
            except OSError:
                await asyncio.sleep(0.2)
        assert [r["run_id"] for r in page["runs"]] == [run_id]
        view = await asyncio.to_thread(get, f"/api/runs/{run_id}")
        assert [n["id"] for n in view["graph"]["nodes"]] == ["fetch", "check", "ship"]
        assert {n["state"] for n in view["nodes"].values()} == {"pending"}  # no worker yet
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def test_the_server_stops_at_once_with_an_event_stream_open(
    worker: InProcessAdapter,
) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    server = TestServer(create_app(AdapterRunSource(worker), poll_seconds=0.05))
    client = TestClient(server)
    await client.start_server()
    response = await client.get(f"/api/runs/{run_id}/events")
    await _next_event(response)
    started = asyncio.get_running_loop().time()
    await server.close()
    assert asyncio.get_running_loop().time() - started < 5
    await client.close()


@pytest.mark.integration
async def test_the_source_lists_shows_and_cancels_azure_runs(azure: Any) -> None:
    import azure_helpers

    flow = shop(delay=0.5, flow_id="azure-shop")
    bp = flow.to_blueprint()
    async with azure_helpers.workers(azure, [bp], flow.registry()) as (worker,):
        source = AdapterRunSource(worker)
        done = await worker.start_workflow(bp, {})
        await worker.wait_for_result(done, timeout=30)
        running = await worker.start_workflow(bp, {})
        assert await source.cancel(running, "not wanted")
        assert not await source.cancel(done, "too late")  # a finished run keeps its outcome
        page = await source.list_runs()
        assert {(r.run_id, r.status) for r in page.runs} == {(done, "completed"),
                                                             (running, "cancelled")}
        assert [r.run_id for r in (await source.list_runs(status="cancelled")).runs] == [running]
        view = await source.get_run(done)
        assert view is not None
        assert {n.state for n in view.nodes.values()} == {"done"}
        assert view.started_at is not None and view.duration_seconds is not None


def test_the_pages_assets_ship_in_the_wheel() -> None:
    import fnmatch
    import tomllib
    from pathlib import Path

    from flowcraft.ui.app import ASSETS

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["flowcraft"]
    assets = [f"ui/assets/{p.name}" for p in ASSETS.iterdir()]
    assert {"ui/assets/index.html", "ui/assets/app.js", "ui/assets/style.css"} <= set(assets)
    assert [a for a in assets if not any(fnmatch.fnmatch(a, p) for p in patterns)] == []


async def test_resume_from_the_page_completes_an_awaiting_run(
    worker: InProcessAdapter, browser: Any,
) -> None:
    run_id = await worker.start_workflow("gated", {})
    await worker.wait_for_result(run_id, timeout=10)
    async with run_view_server(worker, allow_actions=True) as url:
        page = await browser.new_page()
        await page.goto(f"{url}runs/{run_id}")
        await page.wait_for_selector(node("approve", "awaiting"))
        assert await page.input_value("#resume-node") == "approve"
        await page.fill("#resume-action", "yes")
        await page.fill("#resume-data", '{"by": "ada"}')
        await page.click("#resume")
        await page.wait_for_selector('.summary [data-status="completed"]', timeout=15_000)
        await page.wait_for_selector(node("done", "done"))
        await page.click(node("approve"))
        assert json.loads(await page.text_content("#node-output")) == {"by": "ada"}
        assert await page.locator("#resume").count() == 0  # nothing awaits any more


async def test_the_view_serves_webhook_urls_that_resume_their_node() -> None:
    """A ``webhook`` node's URL, served under /webhooks by the run view, resumes it once;
    a wrong token is refused. The token, not --allow-actions, protects it."""
    flow = (Flow("hooked").node("ask", slow(0, {"amount": 5})).node("cb", "webhook")
            .node("pay", slow(0, "paid")).edge("ask", "cb").edge("cb", "pay"))
    runtime = FlowRuntime(blueprints={"hooked": flow.to_blueprint()}, registry=flow.registry())
    adapter = InProcessAdapter(runtime.options, poll_wait_seconds=0.05, lease_seconds=5)
    await adapter.start()
    try:
        from flowcraft.webhook import DistributedWebhookRuns

        client = TestClient(TestServer(create_app(
            AdapterRunSource(adapter), webhooks=DistributedWebhookRuns(adapter))))
        await client.start_server()
        try:
            run_id = await adapter.start_workflow("hooked", {})
            parked = await adapter.wait_for_result(run_id, timeout=10, poll_interval=0.05)
            assert parked.status == "awaiting"
            url = parked.context["_awaitingDetails"]["cb"]["url"]
            token = url.rsplit("/", 1)[1]
            path = f"/webhooks/{run_id}/cb/"
            wrong = await client.post(path + "x" * len(token), json={"by": "eve"})
            assert wrong.status == 403
            answer = await client.post(path + token, json={"by": "ada"})
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["resumed"] == ["cb"]
            result = await adapter.wait_for_result(run_id, timeout=10, poll_interval=0.05)
            assert result.status == "completed"
            assert result.context["_outputs.cb"] == {"by": "ada"}
            again = await client.post(path + token, json={"by": "ada"})
            assert again.status == 404
        finally:
            await client.close()
    finally:
        await adapter.stop(timeout_seconds=5)


async def test_the_runs_page_lists_cloud_runs_through_the_status_index(aws: Any) -> None:
    """On a cloud backend the list is the Client's index query, never a table scan."""
    flow = shop()
    adapter = make_adapter(aws, [flow.to_blueprint()], flow.registry())

    def no_scan(status: str) -> Any:
        raise AssertionError("the run list scanned the status table")

    adapter.backend.statuses.scan = no_scan
    run_ids = [await adapter.start_workflow("shop", {}) for _ in range(3)]
    source = AdapterRunSource(adapter)
    first = await source.list_runs(status="running", limit=2)
    assert len(first.runs) == 2 and first.next_cursor
    rest = await source.list_runs(status="running", limit=2, cursor=first.next_cursor)
    listed = [r.run_id for r in first.runs + rest.runs]
    assert sorted(listed) == sorted(run_ids)
    assert all(r.started_at is not None and r.blueprint_id == "shop"
               for r in first.runs + rest.runs)
    assert (await source.list_runs(status="completed")).runs == []
