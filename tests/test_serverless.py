"""Serverless handlers against the local services: a Lambda handler fed SQS events built
exactly as Lambda builds them from messages received from moto, and a Functions queue
trigger fed Azurite's messages; plus ``handle_job``, which never drops a deferred job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aws_helpers import make_adapter as make_aws_adapter
from aws_helpers import make_moto_dynamodb_atomic
from azure_helpers import make_adapter as make_azure_adapter
from azure_helpers import poison_client
from flowcraft import Flow, NodeContext
from flowcraft.adapters.connect import AzureSettings
from flowcraft.distributed.inprocess import InProcessAdapter
from flowcraft.distributed.job import JobPayload
from flowcraft.runtime.runtime import FlowRuntime
from flowcraft.serverless.aws import make_sqs_handler
from flowcraft.serverless.azure import make_queue_handler


@pytest.fixture(autouse=True)
def _atomic_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)  # see aws_helpers: moto loses concurrent updates


def greeting_flow() -> Flow:
    async def greet(ctx: NodeContext) -> str:
        return f"{ctx.dependencies['greeting']}, {await ctx.context.get('name')}"

    async def shout(ctx: NodeContext) -> str:
        return str(ctx.input).upper()

    async def whisper(ctx: NodeContext) -> str:
        return str(ctx.input).lower()

    return (Flow("greetings").node("greet", greet).node("shout", shout)
            .node("whisper", whisper).edge("greet", "shout").edge("greet", "whisper"))


@contextlib.asynccontextmanager
async def greeting_dependencies() -> AsyncIterator[dict[str, Any]]:
    yield {"greeting": "hello"}


# -- AWS Lambda ----------------------------------------------------------------------------


def lambda_event(messages: list[dict[str, Any]], queue_url: str) -> dict[str, Any]:
    """The event Lambda's SQS event source mapping sends for received messages."""
    name = queue_url.rsplit("/", 1)[-1]
    return {"Records": [{
        "messageId": m["MessageId"],
        "receiptHandle": m["ReceiptHandle"],
        "body": m["Body"],
        "attributes": {
            "ApproximateReceiveCount": m["Attributes"]["ApproximateReceiveCount"],
            "SentTimestamp": m["Attributes"].get("SentTimestamp", "0"),
            "SenderId": m["Attributes"].get("SenderId", "AIDAEXAMPLE"),
            "ApproximateFirstReceiveTimestamp":
                m["Attributes"].get("ApproximateFirstReceiveTimestamp", "0"),
        },
        "messageAttributes": {},
        "md5OfBody": m["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:us-east-1:123456789012:{name}",
        "awsRegion": "us-east-1",
    } for m in messages]}


async def receive(aws: Any, visibility: int = 30) -> list[dict[str, Any]]:
    response = await aws.sqs.receive_message(
        QueueUrl=aws.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
        VisibilityTimeout=visibility, MessageSystemAttributeNames=["All"])
    return list(response.get("Messages", []))


async def invoke(handler: Any, aws: Any, messages: list[dict[str, Any]]) -> set[str]:
    """Call the handler as Lambda does and delete what it did not report as failed."""
    reply = await asyncio.to_thread(handler, lambda_event(messages, aws.queue_url), None)
    failed = {item["itemIdentifier"] for item in reply["batchItemFailures"]}
    done = [m for m in messages if m["MessageId"] not in failed]
    if done:
        await aws.sqs.delete_message_batch(QueueUrl=aws.queue_url, Entries=[
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)])
    return failed


@pytest.fixture
def lambda_env(aws: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in aws.environment().items():
        monkeypatch.setenv(name, value)
    return aws


async def test_lambda_handler_completes_a_run_from_sqs_events(lambda_env: Any) -> None:
    aws = lambda_env
    flow = greeting_flow()
    bp = flow.to_blueprint()
    client = make_aws_adapter(aws, [bp], flow.registry())
    handler = make_sqs_handler(registry=flow.registry(), blueprints={bp.id: bp},
                               dependencies=greeting_dependencies, lease_seconds=30)
    try:
        run_id = await client.start_workflow(bp, {"name": "Ada"})
        invocations = 0
        deadline = time.monotonic() + 30
        while (await client.get_run_status(run_id) or {}).get("status") == "running":
            assert time.monotonic() < deadline, "the run did not finish"
            messages = await receive(aws)
            if messages:
                assert await invoke(handler, aws, messages) == set()
                invocations += 1
            else:
                await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(handler.close)
    result = await client.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.shout"] == "HELLO, ADA"
    assert result.context["_outputs.whisper"] == "hello, ada"
    assert invocations >= 1


async def test_lambda_reports_a_deferred_job_as_a_batch_failure_delayed_by_the_wait(
        lambda_env: Any) -> None:
    aws = lambda_env
    flow = greeting_flow()
    bp = flow.to_blueprint()
    client = make_aws_adapter(aws, [bp], flow.registry())
    handler = make_sqs_handler(registry=flow.registry(), blueprints={bp.id: bp},
                               dependencies={"greeting": "hi"}, lease_seconds=30)
    try:
        run_id = await client.start_workflow(bp, {"name": "Bo"})
        # Another worker holds the start node for 3 s more.
        claim = await client.create_context(run_id).claim("greet", 0, "elsewhere", 3,
                                                          count_attempt=False)
        assert claim.status.name == "CLAIMED"
        [message] = await receive(aws, visibility=60)
        assert await invoke(handler, aws, [message]) == {message["MessageId"]}
        # Not after the 60 s visibility timeout: after the lease's wait (about 3 s).
        assert await receive(aws) == []
        deadline = time.monotonic() + 15
        again: list[dict[str, Any]] = []
        while not again:
            assert time.monotonic() < deadline, "the deferred message did not come back"
            await asyncio.sleep(0.5)
            again = await receive(aws)
        assert [m["MessageId"] for m in again] == [message["MessageId"]]
        assert again[0]["Attributes"]["ApproximateReceiveCount"] == "2"
        assert await invoke(handler, aws, again) == set()  # the lease has expired now
    finally:
        await asyncio.to_thread(handler.close)
    status = await client.get_run_status(run_id) or {}
    assert status["status"] == "running"  # greet ran; its successors are queued
    data = await client.create_context(run_id).load() or {}
    assert data["_outputs.greet"] == "hi, Bo"


async def test_lambda_drops_an_unreadable_message_without_a_batch_failure(
        lambda_env: Any) -> None:
    aws = lambda_env
    await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody="not a job")
    handler = make_sqs_handler(registry={}, blueprints={})
    try:
        messages = await receive(aws)
        assert await invoke(handler, aws, messages) == set()
    finally:
        await asyncio.to_thread(handler.close)
    assert await receive(aws) == []


def test_lambda_handler_refuses_an_event_that_is_not_from_sqs(lambda_env: Any) -> None:
    handler = make_sqs_handler(registry={}, blueprints={})
    try:
        with pytest.raises(ValueError, match="not an SQS event"):
            handler({"detail-type": "Scheduled Event"}, None)
    finally:
        handler.close()


# -- Azure Functions -----------------------------------------------------------------------


class FunctionsQueueMessage:
    """What a Functions queue trigger binds (``func.QueueMessage``): the decoded body."""

    def __init__(self, message: Any) -> None:
        import base64

        self.id = message.id
        self.dequeue_count = message.dequeue_count
        self.pop_receipt = message.pop_receipt
        self._body = base64.b64decode(message.content)

    def get_body(self) -> bytes:
        return self._body


def azure_settings(azure: Any) -> AzureSettings:
    endpoints = azure.services.endpoints
    return AzureSettings(storage_connection_string=endpoints.storage_connection_string,
                         cosmos_connection_string=endpoints.cosmos_connection_string,
                         redis_url=endpoints.redis_url, queue_name=azure.queue_name,
                         database=azure.database, verify_tls=False)


async def azure_messages(azure: Any, visibility: int = 30) -> list[Any]:
    return [m async for m in azure.queue.receive_messages(messages_per_page=32,
                                                           visibility_timeout=visibility)]


async def test_functions_trigger_completes_a_run_from_queue_messages(azure: Any) -> None:
    flow = greeting_flow()
    bp = flow.to_blueprint()
    client = make_azure_adapter(azure, [bp], flow.registry())
    handle = make_queue_handler(registry=flow.registry(), blueprints={bp.id: bp},
                                dependencies=greeting_dependencies,
                                settings=azure_settings(azure))
    outcomes: list[str] = []
    try:
        run_id = await client.start_workflow(bp, {"name": "Cy"})
        deadline = time.monotonic() + 30
        while (await client.get_run_status(run_id) or {}).get("status") == "running":
            assert time.monotonic() < deadline, "the run did not finish"
            received = await azure_messages(azure)
            if not received:
                await asyncio.sleep(0.1)
            for index, message in enumerate(received):
                # Both binding types: func.QueueMessage and the plain text (str).
                given = (FunctionsQueueMessage(message) if index % 2 == 0
                         else FunctionsQueueMessage(message).get_body().decode())
                outcomes.append(await handle(given))
                await azure.queue.delete_message(message)  # the function returned
    finally:
        await handle.aclose()
    result = await client.wait_for_result(run_id, timeout=5)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.shout"] == "HELLO, CY"
    assert "processed" in outcomes and "deferred" not in outcomes


async def test_functions_trigger_sends_a_deferred_job_again_delayed(azure: Any) -> None:
    flow = greeting_flow()
    bp = flow.to_blueprint()
    client = make_azure_adapter(azure, [bp], flow.registry())
    handle = make_queue_handler(registry=flow.registry(), blueprints={bp.id: bp},
                                dependencies={"greeting": "hey"},
                                settings=azure_settings(azure))
    try:
        run_id = await client.start_workflow(bp, {"name": "Di"})
        await client.create_context(run_id).claim("greet", 0, "elsewhere", 3, count_attempt=False)
        [message] = await azure_messages(azure)
        assert await handle(FunctionsQueueMessage(message)) == "requeued"
        await azure.queue.delete_message(message)  # the function returned: Functions deletes
        assert await azure_messages(azure) == []  # the copy waits out the lease
        deadline = time.monotonic() + 15
        again: list[Any] = []
        while not again:
            assert time.monotonic() < deadline, "the deferred job did not come back"
            await asyncio.sleep(0.5)
            again = await azure_messages(azure)
        assert json.loads(FunctionsQueueMessage(again[0]).get_body())["nodeId"] == "greet"
        assert await handle(FunctionsQueueMessage(again[0])) == "processed"
    finally:
        await handle.aclose()


async def test_functions_trigger_moves_an_unreadable_message_to_the_poison_queue(
        azure: Any) -> None:
    handle = make_queue_handler(registry={}, blueprints={}, settings=azure_settings(azure))
    try:
        assert await handle(b"not a job") == "dropped"
    finally:
        await handle.aclose()
    poison = [m.content async for m in poison_client(azure).receive_messages()]
    assert poison == ["not a job"]


async def test_functions_trigger_refuses_what_no_trigger_binds(azure: Any) -> None:
    handle = make_queue_handler(registry={}, blueprints={}, settings=azure_settings(azure))
    try:
        with pytest.raises(TypeError, match="str, bytes or have get_body"):
            await handle(42)
    finally:
        await handle.aclose()


# -- handle_job ----------------------------------------------------------------------------


async def test_handle_job_sends_a_deferred_job_again_instead_of_dropping_it() -> None:
    flow = greeting_flow()
    bp = flow.to_blueprint()
    runtime = FlowRuntime(blueprints={bp.id: bp}, registry=flow.registry(),
                          dependencies={"greeting": "yo"})
    adapter = InProcessAdapter(runtime.options)
    run_id = await adapter.start_workflow(bp, {"name": "Ed"})
    [start] = await adapter.queue.receive(10, 0, 60)
    await adapter.create_context(run_id).claim("greet", 0, "elsewhere", 30, count_attempt=False)
    assert await adapter.handle_job(start.body) == "requeued"
    await adapter.queue.delete([start])  # the caller acknowledges the incoming message
    assert [json.loads(b)["nodeId"] for b in adapter.queue.bodies()] == ["greet"]
    assert await adapter.queue.receive(10, 0, 60) == []  # delayed by the lease's wait
    assert await adapter.handle_job(JobPayload(run_id, bp.id, "greet"),
                                    requeue_deferred=False) == "deferred"
