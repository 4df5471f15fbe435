"""The ``flowcraft`` command on the Azure path (SPEC §9), as subprocesses against the local
services: provision, worker (stopped with SIGTERM), start --wait, status, reconcile, the
one-line errors, and ``flowcraft demo --backend azure-local``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from azure_helpers import REPO, decode, make_adapter, peek, poison_client, receive_all
from cli_helpers import reconcile_every_until_three_failures
from flowcraft import WorkflowBlueprint
from flowcraft.cli import WORKER_CALLS_PREFIX
from flowcraft.local import free_port

REGISTRY = '''
async def double(ctx):
    return (await ctx.context.get("n")) * 2


def inc(ctx):
    return ctx.input + 1


registry = {"double": double, "inc": inc}
'''

BLUEPRINT = {
    "id": "cli-flow",
    "nodes": [{"id": "double", "uses": "double"}, {"id": "inc", "uses": "inc"}],
    "edges": [{"source": "double", "target": "inc"}],
}

AZURE_VARIABLES = ("AZURE_STORAGE_CONNECTION_STRING", "COSMOS_DB_CONNECTION_STRING",
                   "REDIS_CONNECTION_STRING")


async def flowcraft(*args: str, env: dict[str, str], timeout: float = 60.0,
                    ) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", *args, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowcraft: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def project(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "cli-flow.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "cli_nodes.py").write_text(REGISTRY)
    return {"blueprints": str(tmp_path / "blueprints"),
            "registry": f"{tmp_path / 'cli_nodes.py'}:registry"}


async def test_provision_azure_creates_everything_once(azure: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    env = {**azure.environment(), "FLOWCRAFT_QUEUE_NAME": f"cli-{suffix}",
           "FLOWCRAFT_COSMOS_DATABASE": f"clidb-{suffix}"}
    try:
        code, out, err = await flowcraft("provision", "azure", "--context-container", "ctx",
                                         env=env)
        assert code == 0, err
        first_line = out.splitlines()[0]
        assert first_line.startswith("provisioned azure: ")
        for created in (f"queue cli-{suffix}", f"queue cli-{suffix}-poison",
                        f"database clidb-{suffix}", f"container clidb-{suffix}/ctx",
                        f"container clidb-{suffix}/statuses"):
            assert created in first_line
        code, out, err = await flowcraft("provision", "azure", "--context-container", "ctx",
                                         env=env)
        assert code == 0, err
        assert out.splitlines()[0] == "provisioned azure: everything already existed"
        properties = await azure.cosmos.get_database_client(f"clidb-{suffix}") \
            .get_container_client("ctx").read()
        assert properties["partitionKey"]["paths"] == ["/runId"]
    finally:
        await azure.cosmos.delete_database(f"clidb-{suffix}")
        for name in (f"cli-{suffix}", f"cli-{suffix}-poison"):
            await azure.queue_service.delete_queue(name)


async def test_worker_start_status_reconcile_and_a_graceful_sigterm(
        azure: Any, project: dict[str, str]) -> None:
    env = azure.environment()
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "worker", "azure", "--registry", project["registry"],
        "--blueprints", project["blueprints"], "--lease-seconds", "5", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert worker.stdout is not None
        banner = (await asyncio.wait_for(worker.stdout.readline(), 60)).decode()
        assert banner.startswith("flowcraft worker (azure)") and "1 blueprint(s)" in banner

        code, out, err = await flowcraft(
            "start", "azure", "cli-flow", "--blueprints", project["blueprints"],
            "--context", '{"n": 20}', "--wait", "--timeout", "60", env=env, timeout=90)
        assert code == 0, err
        run_id, _, printed = out.partition("\n")
        result = json.loads(printed)
        assert result["status"] == "completed"
        assert result["context"]["_outputs.inc"] == 41

        status_run, reconcile_run = await asyncio.gather(
            flowcraft("status", "azure", run_id, "--context", env=env),
            flowcraft("reconcile", "azure", "--blueprints", project["blueprints"],
                      "--stalled-threshold", "0", env=env))
        code, out, err = status_run
        assert code == 0, err
        shown = json.loads(out)
        assert shown["status"]["status"] == "completed" and shown["status"]["runId"] == run_id
        assert shown["context"]["n"] == 20 and shown["context"]["_outputs.double"] == 40
        code, out, err = reconcile_run
        assert code == 0, err
        # Only running runs are scanned; this one has completed.
        assert out.strip() == "scanned 0 runs, 0 stalled, 0 reconciled, 0 failed"
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        rest, errors = await asyncio.wait_for(worker.communicate(), 30)
    output, errors = rest.decode(), errors.decode()
    assert worker.returncode == 0, errors
    assert "Traceback" not in errors
    assert "flowcraft worker: stopping" in output
    [calls_line] = [line for line in output.splitlines()
                    if line.startswith(WORKER_CALLS_PREFIX)]
    calls = json.loads(calls_line[len(WORKER_CALLS_PREFIX):])
    assert calls.get("queue.GET", 0) >= 1 and calls.get("cosmos.PATCH", 0) >= 2


async def test_reconcile_command_revives_a_run_whose_messages_were_lost(
        azure: Any, project: dict[str, str]) -> None:
    env = azure.environment()
    code, out, err = await flowcraft("start", "azure", "cli-flow", "--blueprints",
                                     project["blueprints"], "--context", '{"n": 1}', env=env)
    assert code == 0, err
    run_id = out.strip()
    [lost] = await receive_all(azure.queue)
    code, out, err = await flowcraft("reconcile", "azure", "--blueprints",
                                     project["blueprints"], "--registry", project["registry"],
                                     "--stalled-threshold", "0", env=env)
    assert code == 0, err
    assert out.strip() == "scanned 1 runs, 1 stalled, 1 reconciled, 0 failed"
    [again] = await peek(azure.queue)
    assert decode(again.content) == decode(lost.content) == {
        "runId": run_id, "blueprintId": "cli-flow", "nodeId": "double"}
    assert not await peek(poison_client(azure))


async def test_reconcile_command_needs_no_node_implementations(
        azure: Any, project: dict[str, str]) -> None:
    """Reconciling only recomputes a run's frontier: as §9 documents the command
    (``flowcraft reconcile aws|azure [--every SECONDS]``), it needs no ``--registry``."""
    blueprint = WorkflowBlueprint.model_validate(BLUEPRINT)
    client = make_adapter(azure, [blueprint], {})
    run_id = await client.start_workflow(blueprint, {"n": 1})
    await receive_all(azure.queue)  # lost
    code, out, err = await flowcraft("reconcile", "azure", "--blueprints",
                                     project["blueprints"], "--stalled-threshold", "0",
                                     env=azure.environment())
    assert code == 0, err
    assert out.strip() == "scanned 1 runs, 1 stalled, 1 reconciled, 0 failed"
    assert [decode(m.content)["runId"] for m in await peek(azure.queue)] == [run_id]


async def test_errors_are_one_line_with_exit_status_2(azure: Any,
                                                      project: dict[str, str]) -> None:
    env = azure.environment()
    bare = {k: v for k, v in env.items() if k not in AZURE_VARIABLES}
    runs = await asyncio.gather(
        flowcraft("status", "azure", "some-run", env=bare),
        flowcraft("start", "azure", "cli-flow", "--blueprints", project["blueprints"],
                  "--context", "{not json", env=env),
        flowcraft("start", "azure", "nope", "--blueprints", project["blueprints"], env=env),
        flowcraft("status", "azure", "no-such-run", env=env),
        flowcraft("start", "azure", "cli-flow", "--blueprints", project["blueprints"],
                  "--context", '{"n": Infinity}', env=env),
        flowcraft("status", "azure", "some-run", env=unreachable_environment()[0]),
    )
    one_line_error(*runs[0][::2], *AZURE_VARIABLES)
    one_line_error(*runs[1][::2], "--context is not valid JSON")
    one_line_error(*runs[2][::2], "unknown blueprint id 'nope'")
    one_line_error(*runs[3][::2], "no run 'no-such-run'")
    one_line_error(*runs[4][::2], "--context holds Infinity")
    one_line_error(*runs[5][::2], "127.0.0.1")  # and no report of an unclosed session
    assert all(code == 2 for code, _, _ in runs)


async def test_demo_on_local_azure_services_runs_to_completion() -> None:
    code, out, err = await flowcraft("demo", "--backend", "azure-local", "--orders", "2",
                                     env=azure_free_environment(), timeout=240)
    assert code == 0, f"{out}\n{err}"
    assert "2/2 runs completed" in out and "Traceback" not in err


def azure_free_environment() -> dict[str, str]:
    """This process's environment without Azure settings: the demo starts its own
    services and must not pick up another test's names."""
    return {k: v for k, v in os.environ.items()
            if k not in AZURE_VARIABLES and not k.startswith("FLOWCRAFT_")
            and k != "COSMOS_DB_VERIFY_TLS"}


async def test_start_azure_refuses_a_run_id_that_exists(azure: Any,
                                                         project: dict[str, str]) -> None:
    env = azure.environment()
    run_id = f"order-{uuid.uuid4().hex[:8]}"
    code, out, err = await flowcraft("start", "azure", "cli-flow", "--blueprints",
                                     project["blueprints"], "--context", '{"n": 1}',
                                     "--run-id", run_id, env=env)
    assert code == 0, err
    assert out.strip() == run_id

    code, _out, err = await flowcraft("start", "azure", "cli-flow", "--blueprints",
                                      project["blueprints"], "--context", '{"n": 2}',
                                      "--run-id", run_id, env=env)
    one_line_error(code, err, f"run '{run_id}' already exists", "--run-id")
    # The first run is untouched: its context, and one start job on the queue.
    code, out, err = await flowcraft("status", "azure", run_id, "--context", env=env)
    assert code == 0, err
    assert json.loads(out)["context"]["n"] == 1
    assert [decode(m.content)["runId"] for m in await receive_all(azure.queue)] == [run_id]


async def test_reconcile_every_keeps_going_while_the_services_are_unreachable(
        project: dict[str, str], tmp_path: Path) -> None:
    env, port = unreachable_environment()
    failures = await reconcile_every_until_three_failures(
        ["azure", "--blueprints", project["blueprints"]], env, tmp_path)
    assert all(f"127.0.0.1:{port}" in line for line in failures), failures


def unreachable_environment() -> tuple[dict[str, str], int]:
    """Connection settings for services that are not there (a free port): connecting fails
    at once."""
    port = free_port()
    return azure_free_environment() | {
        "AZURE_STORAGE_CONNECTION_STRING": (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1"),
        "COSMOS_DB_CONNECTION_STRING": f"AccountEndpoint=http://127.0.0.1:{port}/;"
                                       "AccountKey=a2V5;",
        "REDIS_CONNECTION_STRING": f"redis://127.0.0.1:{port}"}, port
