"""``python -m flowcraft provision|worker|start|status|reconcile aws`` against moto, configured
through environment variables only (as a user would), and the one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aws_helpers import make_moto_dynamodb_atomic, raw_item, receive_all
from cli_helpers import reconcile_every_until_three_failures
from flowcraft.local import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)  # see aws_helpers: moto loses concurrent updates


REGISTRY = '''
import asyncio

async def double(ctx):
    value = ctx.input if ctx.input is not None else await ctx.context.get("n")
    return value * 2

async def slow(ctx):
    await asyncio.sleep(0.5)
    return ctx.input

registry = {"cli.double": double, "cli.slow": slow}
'''

BLUEPRINT = {
    "id": "cli-demo",
    "nodes": [{"id": "a", "uses": "cli.double", "inputs": "n"},
              {"id": "b", "uses": "cli.slow"},
              {"id": "c", "uses": "cli.double"}],
    "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}],
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "cli-demo.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "cli_nodes.py").write_text(REGISTRY)
    return tmp_path


async def cli(*args: str, env: dict[str, str], cwd: Path,
              timeout: float = 60.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowcraft: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


async def test_cli_provision_aws_is_idempotent(aws: Any, project: Path) -> None:
    env = aws.environment()
    # The fixture provisioned these names already (with provision_aws): nothing to do.
    code, out, err = await cli("provision", "aws", env=env, cwd=project)
    assert code == 0, err
    assert "everything already existed" in out and aws.queue_url in out

    suffix = str(time.monotonic_ns())[-8:]
    names = {"FLOWCRAFT_QUEUE_NAME": f"cli-jobs-{suffix}",
             "FLOWCRAFT_CONTEXT_TABLE": f"cli-contexts-{suffix}",
             "FLOWCRAFT_STATUS_TABLE": f"cli-statuses-{suffix}",
             "FLOWCRAFT_COORDINATION_TABLE": f"cli-coordination-{suffix}"}
    fresh = {k: v for k, v in env.items() if k != "SQS_QUEUE_URL"} | names
    code, out, err = await cli("provision", "aws", env=fresh, cwd=project)
    assert code == 0, err
    for name in names.values():
        assert name in out.splitlines()[0]
    assert fresh["FLOWCRAFT_QUEUE_NAME"] in out  # the queue URL is printed
    ttl = await aws.dynamodb.describe_time_to_live(TableName=names["FLOWCRAFT_COORDINATION_TABLE"])
    assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED", "AttributeName": "ttl"}
    key = await aws.dynamodb.describe_table(TableName=names["FLOWCRAFT_COORDINATION_TABLE"])
    assert key["Table"]["KeySchema"] == [{"AttributeName": "key", "KeyType": "HASH"}]


async def test_cli_reconcile_aws_resumes_a_run_whose_start_job_was_lost(
        aws: Any, project: Path) -> None:
    """``flowcraft reconcile aws`` needs blueprints, not node implementations (it runs no
    node), so it takes no --registry."""
    env = aws.environment()
    blueprints = str(project / "blueprints")
    code, out, err = await cli("start", "aws", "cli-demo", "--blueprints", blueprints,
                               "--context", '{"n": 5}', env=env, cwd=project)
    assert code == 0, err
    lost_run = out.strip()
    assert (await raw_item(aws, aws.status_table, {"runId": lost_run}))["status"]["S"] == (
        "running")
    assert len(await receive_all(aws.sqs, aws.queue_url)) == 1  # the start job is lost

    code, out, err = await cli("reconcile", "aws", "--blueprints", blueprints, env=env,
                               cwd=project)
    assert code == 0, err
    # Default 300 s: the status index returns no run that recent.
    assert "scanned 0 runs, 0 stalled, 0 reconciled, 0 failed" in out

    code, out, err = await cli("reconcile", "aws", "--blueprints", blueprints,
                               "--stalled-threshold", "0", env=env, cwd=project)
    assert code == 0, err
    assert "scanned 1 runs, 1 stalled, 1 reconciled, 0 failed" in out
    (job,) = [json.loads(m["Body"]) for m in await receive_all(aws.sqs, aws.queue_url)]
    assert job == {"runId": lost_run, "blueprintId": "cli-demo", "nodeId": "a"}


async def test_cli_worker_start_wait_status_and_sigterm(aws: Any, project: Path) -> None:
    env = aws.environment()
    blueprints = str(project / "blueprints")
    log = (project / "worker.out").open("w")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "worker", "aws", "--registry",
        "cli_nodes.py:registry", "--blueprints", blueprints, "--lease-seconds", "5",
        "--poll-seconds", "2", env=env, cwd=project, stdout=log, stderr=asyncio.subprocess.PIPE)
    try:
        code, out, err = await cli("start", "aws", "cli-demo", "--blueprints", blueprints,
                                   "--context", '{"n": 2}', "--wait", "--timeout", "60",
                                   env=env, cwd=project, timeout=90)
        assert code == 0, err
        run_id, _, result_json = out.partition("\n")
        result = json.loads(result_json)
        assert result["runId"] == run_id and result["status"] == "completed"
        assert result["context"]["_outputs.c"] == 8 and result["errors"] == []

        code, out, err = await cli("status", "aws", run_id, "--context", env=env, cwd=project)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["status"]["status"] == "completed"
        assert shown["status"]["blueprintId"] == "cli-demo"
        assert shown["context"]["_outputs.a"] == 4

        assert worker.returncode is None  # still working
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        _, worker_err = await asyncio.wait_for(worker.communicate(), 30)
        log.close()
    output = (project / "worker.out").read_text()
    assert worker.returncode == 0, (output, worker_err.decode())
    assert "Traceback" not in worker_err.decode()
    assert "flowcraft worker (aws)" in output and "stopping" in output
    (calls_line,) = [line for line in output.splitlines()
                     if line.startswith("flowcraft worker: service calls ")]
    calls = json.loads(calls_line.removeprefix("flowcraft worker: service calls "))
    assert calls["sqs.ReceiveMessage"] >= 1 and calls["dynamodb.UpdateItem"] >= 6


def run_main_in_process(argv: list[str], environment: dict[str, str]) -> tuple[int, str]:
    """``flowcraft.cli.main(argv)`` in this process (no interpreter start-up per case);
    returns its exit code and what it wrote to stderr. An exception it lets escape fails the
    test with its traceback."""
    from flowcraft.cli import main

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        for name, value in environment.items():
            if os.environ.get(name) != value:
                patch.setenv(name, value)
        for name in set(os.environ) - set(environment):
            patch.delenv(name)
        code = main(argv)
    return code, stderr.getvalue()


async def test_cli_errors_are_one_line_with_exit_code_2(aws: Any, project: Path) -> None:
    env = aws.environment()
    blueprints = str(project / "blueprints")
    no_queue = {k: v for k, v in env.items() if k != "SQS_QUEUE_URL"} | {
        "FLOWCRAFT_QUEUE_NAME": "no-such-queue"}
    unreachable = env | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                         "AWS_MAX_ATTEMPTS": "1"}  # no retries: fail fast

    bad_table = f"bad-coordination-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    await aws.dynamodb.create_table(
        TableName=bad_table,
        AttributeDefinitions=[{"AttributeName": "coordinationKey", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "coordinationKey", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST")

    # As separate processes: what a user sees on stderr, start-up to exit.
    processes = [
        (("start", "aws", "cli-demo", "--blueprints", blueprints), no_queue,
         ["no-such-queue", "does not exist", "provision aws"]),
        (("status", "aws", "some-run"), unreachable, ["127.0.0.1"]),
        (("start", "aws", "cli-demo", "--blueprints", blueprints, "--context", "{bad json"),
         env, ["--context is not valid JSON"]),
        (("start", "aws", "cli-demo", "--blueprints", blueprints, "--context",
          '{"n": NaN}'), env, ["--context holds NaN"]),
    ]
    results = await asyncio.gather(*(cli(*args, env=case_env, cwd=project)
                                     for args, case_env, _ in processes))
    for (args, _, fragments), (code, _out, err) in zip(processes, results, strict=True):
        try:
            one_line_error(code, err, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"flowcraft {' '.join(args)}: {exc}") from None

    # More mistakes, in this process (cheaper): the same main(), the same handling.
    in_process = [
        (["start", "aws", "cli-demo", "--blueprints", blueprints, "--context", "[1]"], env,
         ["--context must be a JSON object"]),
        (["start", "aws", "nope", "--blueprints", blueprints], env,
         ["unknown blueprint id 'nope'"]),
        (["status", "aws", "no-such-run"], env, ["no run 'no-such-run'"]),
        (["worker", "aws", "--blueprints", blueprints], env, ["--registry"]),
        (["provision", "aws"], env | {"FLOWCRAFT_COORDINATION_TABLE": bad_table},
         [bad_table, "coordinationKey"]),
    ]
    for argv, case_env, fragments in in_process:
        code, err = await asyncio.to_thread(run_main_in_process, argv, case_env)
        try:
            one_line_error(code, err, *fragments)
        except AssertionError as exc:
            raise AssertionError(f"flowcraft {' '.join(argv)}: {exc}") from None
    # Nothing was started by the failed commands.
    assert await receive_all(aws.sqs, aws.queue_url) == []


async def test_cli_start_aws_refuses_a_run_id_that_exists(aws: Any, project: Path) -> None:
    env = aws.environment()
    blueprints = str(project / "blueprints")
    run_id = f"order-{time.monotonic_ns()}"
    code, out, err = await cli("start", "aws", "cli-demo", "--blueprints", blueprints,
                               "--context", '{"n": 1}', "--run-id", run_id, env=env,
                               cwd=project)
    assert code == 0, err
    assert out.strip() == run_id

    code, _out, err = await cli("start", "aws", "cli-demo", "--blueprints", blueprints,
                                "--context", '{"n": 2}', "--run-id", run_id, env=env,
                                cwd=project)
    one_line_error(code, err, f"run '{run_id}' already exists", "--run-id")
    # The first run is untouched: its context, and one start job on the queue.
    code, out, err = await cli("status", "aws", run_id, "--context", env=env, cwd=project)
    assert code == 0, err
    assert json.loads(out)["context"]["n"] == 1
    assert [json.loads(m["Body"])["runId"] for m in await receive_all(aws.sqs, aws.queue_url)
            ] == [run_id]


async def test_cli_reconcile_every_keeps_going_after_a_failed_pass(
        aws: Any, project: Path) -> None:
    """A service that is briefly unreachable fails a pass, not the reconciler — also when
    it is unreachable from the start (the queue URL must be looked up): each failure is
    one line on stderr, and SIGTERM ends it with status 0."""
    unreachable = aws.environment() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                                       "AWS_MAX_ATTEMPTS": "1"}  # no retries: fail fast
    no_url = {k: v for k, v in unreachable.items() if k != "SQS_QUEUE_URL"}
    args = ["aws", "--blueprints", str(project / "blueprints")]
    for failures in await asyncio.gather(
            reconcile_every_until_three_failures(args, unreachable, project),
            reconcile_every_until_three_failures(args, no_url, project)):
        assert all("127.0.0.1" in line for line in failures), failures
