"""Helpers for the AWS adapter tests: workers on the ``aws`` fixture's queue and tables,
queue inspection, and the TypeScript library's client.

Imported as a plain module (``tests/`` is on ``sys.path`` under pytest's default import
mode), like ``distributed_helpers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from distributed_helpers import ReceiveRecorder
from flowcraft import FlowRuntime, WorkflowBlueprint
from flowcraft.adapters.aws import DynamoDbCoordinationStore, SqsAdapter
from flowcraft.distributed.backend import Backend, QueueMessage
from flowcraft.distributed.job import JobPayload

REPO = Path(__file__).resolve().parents[1]
LOCAL_SERVICES = REPO / "tools" / "local-services"
JS_START_WORKFLOW = REPO / "tests" / "js" / "aws_start_workflow.mjs"

def make_moto_dynamodb_atomic(monkeypatch: Any) -> None:
    """Serialise moto's DynamoDB requests, as DynamoDB serialises the writes of one item.

    moto's server handles each request on a thread of its own and its DynamoDB backend has
    no lock: an UpdateItem is a read-modify-write, so concurrent updates of one item are
    lost (50 concurrent ``ADD v :one`` end at 42..48), a condition can be checked against
    a state another request is changing, and serialising an item that another request
    changes can fail with HTTP 500 after the update was applied (botocore's retry then
    fails the condition). Real DynamoDB applies each single-item write atomically, and the
    adapter (conditional claims and commits, counters, join sets) relies on that. The
    server runs in this process (``ThreadedMotoServer``), so a lock around moto's DynamoDB
    request handler restores the guarantee for the test (``monkeypatch`` undoes it).
    tests/test_crash.py does the same (its ``atomic_moto_dynamodb`` fixture).
    """
    import threading

    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    original = DynamoHandler.call_action

    def call_action(self: Any) -> Any:
        with lock:
            return original(self)

    monkeypatch.setattr(DynamoHandler, "call_action", call_action)


FAST = {"poll_wait_seconds": 1, "lease_seconds": 5, "status_touch_seconds": 0}
"""Adapter options that keep the tests quick (short long polls and leases)."""


class RecordingSqsAdapter(SqsAdapter):
    """An ``SqsAdapter`` that remembers every message it received (body and receive count)
    and can crash at the job algorithm's checkpoints (``crash_at = {("before_run", "b")}``
    crashes every attempt of node ``b`` there)."""

    def __init__(self, *args: Any, crash_at: Iterable[tuple[str, str]] = (),
                 **kwargs: Any) -> None:
        self.received: list[QueueMessage] = []
        self.crash_at = set(crash_at)
        super().__init__(*args, **kwargs)
        self.algorithm.checkpoint = self._checkpoint

    def create_backend(self) -> Backend:
        backend = super().create_backend()
        backend.queue = ReceiveRecorder(backend.queue, self.received)
        return backend

    async def _checkpoint(self, step: str, job: JobPayload) -> None:
        if (step, job.node_id) in self.crash_at:
            raise RuntimeError(f"injected crash at {step} of {job.node_id}")

    def received_jobs(self, node_id: str) -> list[QueueMessage]:
        out = []
        for message in self.received:
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(message.body).get("nodeId") == node_id:
                    out.append(message)
        return out


def runtime_for(blueprints: Iterable[WorkflowBlueprint], registry: Mapping[str, Any]
                ) -> FlowRuntime:
    return FlowRuntime(blueprints={bp.id: bp for bp in blueprints}, registry=dict(registry))


def make_adapter(aws: Any, blueprints: Iterable[WorkflowBlueprint],
                 registry: Mapping[str, Any], *, cls: type[SqsAdapter] = RecordingSqsAdapter,
                 queue_url: str | None = None, **options: Any) -> Any:
    runtime = runtime_for(blueprints, registry)
    coordination = DynamoDbCoordinationStore(client=aws.dynamodb,
                                             table_name=aws.coordination_table)
    return cls(runtime.options, coordination, aws.sqs, aws.dynamodb, queue_url or aws.queue_url,
               context_table_name=aws.context_table, status_table_name=aws.status_table,
               **{**FAST, **options})


@contextlib.asynccontextmanager
async def workers(aws: Any, blueprints: Iterable[WorkflowBlueprint],
                  registry: Mapping[str, Any], count: int = 1,
                  **options: Any) -> AsyncIterator[list[Any]]:
    """``count`` started workers on the fixture's queue; stopped on exit."""
    blueprints = list(blueprints)
    started = [make_adapter(aws, blueprints, registry, **options) for _ in range(count)]
    for worker in started:
        await worker.start()
    try:
        yield started
    finally:
        for worker in started:
            await worker.stop(timeout_seconds=5)


async def queue_counts(sqs: Any, queue_url: str) -> dict[str, int]:
    """Visible, in-flight and delayed messages of a queue."""
    attributes = (await sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages",
                                            "ApproximateNumberOfMessagesNotVisible",
                                            "ApproximateNumberOfMessagesDelayed"]))["Attributes"]
    return {"visible": int(attributes["ApproximateNumberOfMessages"]),
            "in_flight": int(attributes["ApproximateNumberOfMessagesNotVisible"]),
            "delayed": int(attributes["ApproximateNumberOfMessagesDelayed"])}


async def wait_queue_empty(sqs: Any, queue_url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = await queue_counts(sqs, queue_url)
        if not any(counts.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"queue not empty after {timeout:g}s: {counts}")
        await asyncio.sleep(0.1)


async def receive_all(sqs: Any, queue_url: str, *, delete: bool = True,
                      visibility: int = 30) -> list[dict[str, Any]]:
    """Every currently visible message (deleted unless ``delete=False``)."""
    messages: list[dict[str, Any]] = []
    while True:
        response = await sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
            VisibilityTimeout=visibility, MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"])
        batch = response.get("Messages", [])
        if not batch:
            return messages
        messages.extend(batch)
        if delete:
            for message in batch:
                await sqs.delete_message(QueueUrl=queue_url,
                                         ReceiptHandle=message["ReceiptHandle"])


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                   interval: float = 0.05) -> None:
    """Wait until ``predicate()`` (sync or async) is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


async def raw_item(aws: Any, table: str, key: Mapping[str, str]) -> dict[str, Any] | None:
    response = await aws.dynamodb.get_item(
        TableName=table, Key={k: {"S": v} for k, v in key.items()}, ConsistentRead=True)
    return response.get("Item")


# -- the TypeScript library's client -------------------------------------------------------------

# ESM ignores NODE_PATH, so bare imports ('flowcraft', '@aws-sdk/...') of tests/js/*.mjs are
# resolved from tools/local-services by a module resolve hook, registered with
# `node --import`. The snippet keeps its static imports exactly as documented.
_RESOLVE_HOOK = """
const BASE = %s;
export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context);
  } catch (error) {
    if (error?.code !== 'ERR_MODULE_NOT_FOUND' || /^(\\.|\\/|[a-z]+:)/.test(specifier)) throw error;
    return nextResolve(specifier, { ...context, parentURL: BASE });
  }
}
"""


def node_resolve_hook_argument() -> str:
    base = (LOCAL_SERVICES / "package.json").as_uri()
    hook = "data:text/javascript," + urllib.parse.quote(_RESOLVE_HOOK % json.dumps(base))
    register = f'import {{ register }} from "node:module"; register({json.dumps(hook)});'
    return "data:text/javascript," + urllib.parse.quote(register)


def run_js_start_workflow(environment: Mapping[str, str], blueprint: WorkflowBlueprint,
                          initial_context: Mapping[str, Any], tmp_path: Path,
                          timeout: float = 60.0) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Start a run with the TypeScript library's ``startWorkflow``; returns (run id, process)."""
    assert (LOCAL_SERVICES / "node_modules" / "flowcraft").is_dir(), (
        "the reference's npm packages are missing: run scripts/setup")
    blueprint_file = tmp_path / f"{blueprint.id}.json"
    blueprint_file.write_text(json.dumps(blueprint.to_dict()), encoding="utf-8")
    process = subprocess.run(
        ["node", "--import", node_resolve_hook_argument(), str(JS_START_WORKFLOW),
         str(blueprint_file), json.dumps(initial_context)],
        env={**os.environ, **environment}, capture_output=True, text=True, timeout=timeout,
        cwd=REPO,
    )
    assert process.returncode == 0, f"node failed ({process.returncode}):\n{process.stderr}"
    lines = process.stdout.strip().splitlines()
    run_id = lines[-1].strip()
    assert f"Workflow {run_id} started." in lines, process.stdout
    return run_id, process


async def peek(sqs: Any, queue_url: str) -> list[dict[str, Any]]:
    """Receive once and leave the messages visible (as a worker that died at once would):
    each call raises their ``ApproximateReceiveCount``."""
    response = await sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0, VisibilityTimeout=0,
        MessageSystemAttributeNames=["All"])
    return list(response.get("Messages", []))
