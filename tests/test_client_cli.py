"""``flowcraft runs|cancel|resume|--version`` and the ``start --wait`` progress line, against
the local services of both clouds, configured through environment variables as a user would."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import aws_helpers
import azure_helpers
from distributed_helpers import Executions
from flowcraft import Flow, __version__
from flowcraft.cli import show_progress
from flowcraft.client import Client

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_helpers.make_moto_dynamodb_atomic(monkeypatch)


@pytest.fixture(params=["aws", "azure"])
def cloud(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def services(cloud: str, request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(cloud)


@pytest.fixture
def env(cloud: str, services: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The fixture's resources as environment variables, for the CLI and for this process's
    ``Client.from_env``."""
    env = {**services.environment(), "COSMOS_DB_VERIFY_TLS": "false"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


async def cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def approval() -> tuple[Flow, Executions]:
    runs = Executions()
    flow = (Flow("approval")
            .node("request", runs.node(lambda ctx: 1))
            .wait("approve")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .edge("request", "approve")
            .edge("approve", "pay", action="approved"))
    return flow, runs


def write_blueprints(tmp_path: Path, flow: Flow) -> Path:
    directory = tmp_path / "blueprints"
    directory.mkdir()
    blueprint = flow.to_blueprint().model_dump(mode="json", exclude_none=True)
    (directory / "approval.json").write_text(json.dumps(blueprint))
    return directory


async def test_version(tmp_path: Path) -> None:
    code, out, _ = await cli("--version", env=dict(os.environ), cwd=tmp_path)
    assert (code, out.strip()) == (0, f"flowcraft {__version__}")


async def test_runs_lists_filters_and_pages(cloud: str, env: dict[str, str],
                                            tmp_path: Path) -> None:
    flow, _ = approval()
    async with Client.from_env(cloud, blueprints=[flow.to_blueprint()]) as client:
        ids = [await client.start("approval", run_id=f"run-{i}") for i in range(3)]
    code, out, err = await cli("runs", cloud, "--status", "running", "--json", env=env,
                               cwd=tmp_path)
    assert code == 0, err
    listed = json.loads(out)
    assert sorted(r["runId"] for r in listed["runs"]) == ids
    assert {r["status"] for r in listed["runs"]} == {"running"}
    assert listed["nextCursor"] is None

    code, out, err = await cli("runs", cloud, "--blueprint", "approval", "--limit", "2",
                               env=env, cwd=tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "STATUS", "BLUEPRINT", "LAST", "UPDATED"]
    assert lines[-1].startswith("more: --cursor ")
    first = [line.split()[0] for line in lines[1:-1]]
    code, out, err = await cli("runs", cloud, "--blueprint", "approval", "--limit", "2",
                               "--cursor", lines[-1].split()[-1], env=env, cwd=tmp_path)
    assert code == 0, err
    rest = [line.split()[0] for line in out.splitlines()[1:] if not line.startswith("more:")]
    assert sorted(first + rest) == ids

    code, _, err = await cli("runs", cloud, "--status", "done", env=env, cwd=tmp_path)
    assert code == 2 and "--status done: use one of running" in err


async def test_cancel_and_resume(cloud: str, services: Any, env: dict[str, str],
                                 tmp_path: Path) -> None:
    flow, runs = approval()
    bp = flow.to_blueprint()
    blueprints = write_blueprints(tmp_path, flow)
    helpers = aws_helpers if cloud == "aws" else azure_helpers
    async with helpers.workers(services, [bp], flow.registry()), Client.from_env(
            cloud, blueprints=[bp]) as client:
        parked = await client.start("approval")
        assert (await client.result(parked, timeout=30)).status == "awaiting"
        code, out, err = await cli("resume", cloud, parked, "approve", "--action", "approved",
                                   "--data", '{"by": "ada"}', "--blueprints",
                                   str(blueprints), env=env, cwd=tmp_path)
        assert code == 0, err
        assert "node approve resumed with action 'approved'" in out
        result = await client.result(parked, timeout=30)
        assert result.status == "completed"
        assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}

        code, _, err = await cli("resume", cloud, parked, "approve", "--data", "not json",
                                 "--blueprints", str(blueprints), env=env, cwd=tmp_path)
        assert code == 2 and "is not JSON" in err

        waiting = await client.start("approval")
        assert (await client.result(waiting, timeout=30)).status == "awaiting"
        code, out, err = await cli("cancel", cloud, waiting, "--reason", "no longer needed",
                                   env=env, cwd=tmp_path)
        assert code == 0, err
        status = await client.status(waiting)
        assert status.status == "cancelled" and status.reason == "no longer needed"
        code, _, err = await cli("cancel", cloud, waiting, env=env, cwd=tmp_path)
        assert code == 1 and "is cancelled already" in err
        code, _, err = await cli("cancel", cloud, "no-such-run", env=env, cwd=tmp_path)
        assert code == 2 and "no run 'no-such-run'" in err
    assert runs.counts == {"request": 2, "pay": 1}


async def test_start_wait_progress_line(aws: Any) -> None:
    flow = (Flow("steps").node("a", lambda ctx: 1).node("b", lambda ctx: 2)
            .node("c", lambda ctx: 3).edge("a", "b").edge("b", "c"))
    bp = flow.to_blueprint()
    out = io.StringIO()
    async with aws_helpers.workers(aws, [bp], flow.registry()), Client.from_aws(
            aws.sqs, aws.dynamodb, aws.queue_url, blueprints=[bp],
            context_table=aws.context_table, status_table=aws.status_table,
            coordination_table=aws.coordination_table) as client:
        run_id = await client.start("steps")
        await show_progress(client, run_id, 30, out)
    lines = out.getvalue().split("\r")
    assert lines[-1].strip() == "3/3 nodes done (completed)"
    assert out.getvalue().endswith("\n")
