"""Stopping a worker never strands a message.

A queue receive the worker gives up on is not given up by the service: SQS (and moto)
keep a long poll running after the client has gone and hide what it then takes for the
whole visibility timeout; a Queue Storage GET that was on the wire has dequeued its
messages whether or not the response is read. These tests stop workers in the middle of
a receive and check that whatever it took is visible again at once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aws_helpers import make_adapter as make_aws_adapter
from aws_helpers import make_moto_dynamodb_atomic, queue_counts
from azure_helpers import FAST, RecordingAzureAdapter, runtime_for
from flowcraft import WorkflowBlueprint
from flowcraft.adapters.azure import RedisCoordinationStore
from flowcraft.distributed.adapter import QueueMessage
from flowcraft.distributed.job import JobPayload

pytestmark = pytest.mark.integration

LEASE = 30
"""The visibility timeout a stranded message would be hidden for: far above 'promptly'."""

BLUEPRINT = {"id": "shutdown", "nodes": [{"id": "a", "uses": "shutdown.double"}], "edges": []}
REGISTRY = '''
async def double(ctx):
    return (await ctx.context.get("n")) * 2

registry = {"shutdown.double": double}
'''


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)


async def _start_worker(env: dict[str, str], project: Path, name: str, *extra: str) -> Any:
    log = (project / f"{name}.out").open("w")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "worker", "aws", "--registry",
        "nodes.py:registry", "--blueprints", str(project / "blueprints"),
        "--lease-seconds", str(LEASE), *extra, env=env, cwd=project, stdout=log,
        stderr=asyncio.subprocess.PIPE)
    log.close()
    deadline = time.monotonic() + 60
    while "flowcraft worker (aws)" not in (project / f"{name}.out").read_text():
        assert process.returncode is None, await process.stderr.read()
        assert time.monotonic() < deadline, "the worker did not start"
        await asyncio.sleep(0.05)
    return process


async def _finish(process: Any, timeout: float) -> tuple[int, str]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, err.decode()


async def test_a_run_started_after_a_worker_restart_completes_promptly(
        aws: Any, tmp_path: Path) -> None:
    """SIGTERM a worker while its long poll waits on the empty queue, start a run, start a
    new worker: the run's first job must not sit hidden in the old worker's poll."""
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "shutdown.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "nodes.py").write_text(REGISTRY)
    env = aws.environment()

    old = await _start_worker(env, tmp_path, "old")
    await asyncio.sleep(1.0)  # its long poll (20 s) is now waiting on the server
    old.send_signal(signal.SIGTERM)

    started = time.monotonic()
    client = make_aws_adapter(aws, [WorkflowBlueprint.model_validate(BLUEPRINT)], {})
    run_id = await client.start_workflow("shutdown", {"n": 21})
    new = await _start_worker(env, tmp_path, "new", "--poll-seconds", "2")  # stops sooner
    try:
        result = await client.wait_for_result(run_id, timeout=LEASE + 15)
        elapsed = time.monotonic() - started
        print(f"run completed {elapsed:.1f}s after the old worker's SIGTERM")
    finally:
        new_code, new_err = await _finish(new, 30)
        old_code, old_err = await _finish(old, 30)
    assert result.status == "completed" and result.context["_outputs.a"] == 42
    # Start-up of the new worker's interpreter included; a stranded job would take LEASE.
    assert elapsed < LEASE / 2, f"the run took {elapsed:.1f}s"
    assert (old_code, new_code) == (0, 0), (old_err, new_err)
    assert "Traceback" not in old_err + new_err


async def test_sqs_worker_stopped_during_a_long_poll_puts_back_what_it_receives(
        aws: Any) -> None:
    worker = make_aws_adapter(aws, [], {}, poll_wait_seconds=3, lease_seconds=LEASE)
    await worker.start()
    await asyncio.sleep(0.5)  # the long poll is waiting on the server
    stopping = asyncio.create_task(worker.stop(timeout_seconds=5))
    await asyncio.sleep(0.2)
    job = JobPayload("run-1", "shutdown", "a")
    await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=job.to_json())
    await asyncio.wait_for(stopping, 10)
    assert worker.received == [] or [m.body for m in worker.received] == [job.to_json()]
    # Visible again at once, not after the lease.
    response = await aws.sqs.receive_message(QueueUrl=aws.queue_url, WaitTimeSeconds=2,
                                             VisibilityTimeout=LEASE)
    assert [json.loads(m["Body"]) for m in response.get("Messages", [])] == [job.to_dict()]
    assert (await queue_counts(aws.sqs, aws.queue_url))["visible"] == 0


class SlowResponseAzureAdapter(RecordingAzureAdapter):
    """The response of a Queue Storage GET arrives late (a slow network): the service has
    dequeued the messages before the worker sees them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = asyncio.Event()
        queue = self.backend.queue
        receive_once = queue.receive_once

        async def slow_receive_once(max_messages: int) -> list[QueueMessage]:
            messages: list[QueueMessage] = await receive_once(max_messages)
            if messages:
                self.in_flight.set()
                await asyncio.sleep(1.0)
            return messages

        queue.receive_once = slow_receive_once  # the queue's receive calls it


async def test_azure_worker_stopped_during_a_receive_puts_back_what_it_received(
        azure: Any) -> None:
    worker = SlowResponseAzureAdapter(
        runtime_for([], {}).options, RedisCoordinationStore(azure.redis), azure.queue,
        azure.cosmos, cosmos_database_name=azure.database,
        context_container_name=azure.context_container,
        status_container_name=azure.status_container, **{**FAST, "lease_seconds": LEASE})
    job = JobPayload("run-1", "shutdown", "a")
    await azure.queue.send_message(job.to_base64())
    await worker.start()
    await asyncio.wait_for(worker.in_flight.wait(), 10)
    await asyncio.wait_for(worker.stop(timeout_seconds=5), 10)
    assert worker.received == []  # the stop came before the worker saw the response
    # Visible again at once, not after the lease.
    pages = azure.queue.receive_messages(messages_per_page=32, visibility_timeout=LEASE)
    assert [message.content async for message in pages] == [job.to_base64()]


async def test_a_second_signal_stops_the_worker_without_waiting_for_its_receive(
        aws: Any, tmp_path: Path) -> None:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "shutdown.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "nodes.py").write_text(REGISTRY)
    worker = await _start_worker(aws.environment(), tmp_path, "worker")
    await asyncio.sleep(1.0)  # its long poll (20 s) is now waiting on the server
    worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while "stopping" not in (tmp_path / "worker.out").read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert worker.returncode is None  # waiting for the receive
    started = time.monotonic()
    code, err = await _finish(worker, 10)
    assert code == 0, err
    assert time.monotonic() - started < 5
    assert "stopped without waiting" in (tmp_path / "worker.out").read_text()
    assert "Traceback" not in err
