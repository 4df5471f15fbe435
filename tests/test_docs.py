"""Runs the code examples of README.md and docs/*.md, so the documentation stays true.

How examples are written, and how they are tested
-------------------------------------------------

* Every block fenced as ```python is a test case, named ``<file>:<line>``. Blocks fenced
  as ```python-notest (only for code that needs a real cloud account), ```bash, ```hcl,
  ```json, ```text ... are not run.
* A block runs as a fresh module named ``docs_example``, in an empty temporary working
  directory, with a time limit. Code under ``if __name__ == "__main__":`` does not run
  (short examples call ``asyncio.run(main())`` at the top level).
* Output: when a ```text block follows a python block (with only blank lines, or a line
  ``Output:``, between them), the block's standard output must equal it line by line;
  ``...`` inside an expected line matches any text (run ids, timestamps).
* Blocks of docs/aws.md run against the local moto server (the ``moto`` fixture), each
  in a fresh AWS account (``MOTO_ACCOUNT_ID``; the server runs in this process) in which
  the setup guide's queue and tables already exist; AWS_ENDPOINT_URL, AWS_REGION,
  credentials and SQS_QUEUE_URL are set. Blocks of docs/azure.md run against Azurite, the
  local Cosmos DB server and redis-server (the ``azure_services_session`` fixture), with
  the guide's queue, database and containers freshly created and
  AZURE_STORAGE_CONNECTION_STRING, COSMOS_DB_CONNECTION_STRING, COSMOS_DB_VERIFY_TLS=false
  and REDIS_CONNECTION_STRING set.
* Long-running examples are written so that scenario tests (further down) can drive them:
  a worker is a script whose ``async def main()`` runs until SIGINT/SIGTERM — the test
  starts it as a process (``python worker.py``) and stops it with SIGTERM; clients,
  reconcilers and serverless handlers are functions (``start_workflow(blueprint,
  initial_context)``, ``reconcile()``, ``handler(event, context)``, ...) that the tests
  import from the block and call. Scenario tests find a block by the function it defines,
  so the docs may be reordered freely.
* docs/cli.md: representative commands run as subprocesses (``python -m flowcraft ...``);
  each command a test runs must appear verbatim in docs/cli.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOC_FILES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
PYTHON = sys.executable
BLOCK_TIME_LIMIT = 60  # seconds per example


# -- finding the examples ----------------------------------------------------------------------


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    expected_output: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def defines(self, name: str) -> bool:
        return re.search(rf"^(async )?def {re.escape(name)}\(", self.code, re.M) is not None


FENCE = re.compile(r"^```(\S*)\s*$")


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    between: list[str] = []  # the text since the last block closed
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            between.append(lines[index])
            index += 1
            continue
        start = index
        index += 1
        body: list[str] = []
        while index < len(lines) and lines[index].rstrip() != "```":
            body.append(lines[index])
            index += 1
        index += 1  # the closing fence
        block = Block(path, start + 1, match.group(1), "\n".join(body) + "\n")
        gap = [text.strip() for text in between if text.strip()]
        if (block.language == "text" and blocks and blocks[-1].language == "python"
                and gap in ([], ["Output:"])):
            blocks[-1].expected_output = block.code
        blocks.append(block)
        between = []
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in parse_blocks(path)]
PYTHON_BLOCKS = [block for block in ALL_BLOCKS if block.language == "python"]


def blocks_of(filename: str) -> list[Block]:
    return [block for block in PYTHON_BLOCKS if block.path.name == filename]


def block_defining(filename: str, function: str, containing: str = "") -> Block:
    found = [block for block in blocks_of(filename)
             if block.defines(function) and containing in block.code]
    assert len(found) == 1, (
        f"expected one python block in {filename} defining {function}() "
        f"containing {containing!r}, found {[b.name for b in found]}")
    return found[0]


# -- running one example -------------------------------------------------------------------------


def load_module(block: Block) -> types.ModuleType:
    """Execute a block as the module ``docs_example`` (its ``__main__`` part does not run)."""
    module = types.ModuleType("docs_example")
    module.__file__ = str(block.path)
    sys.modules["docs_example"] = module  # dataclasses and pickling look modules up
    try:
        exec(compile(block.code, block.name, "exec"), module.__dict__)
    finally:
        sys.modules.pop("docs_example", None)
    return module


def run_block(block: Block) -> str:
    """Run a block; return what it printed (from any thread)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        load_module(block)
    return buffer.getvalue()


def check_output(block: Block, actual: str) -> None:
    if block.expected_output is None:
        return
    expected = block.expected_output.rstrip("\n").split("\n")
    got = actual.rstrip("\n").split("\n")
    problems = []
    if len(expected) != len(got):
        problems.append(f"{len(got)} lines printed, {len(expected)} documented")
    for number, (want, have) in enumerate(zip(expected, got, strict=False), 1):
        pattern = ".*".join(re.escape(part) for part in want.rstrip().split("..."))
        if not re.fullmatch(pattern, have.rstrip()):
            problems.append(f"line {number}: documented {want!r}, printed {have!r}")
    assert not problems, (
        f"{block.name}: the documented output differs:\n  " + "\n  ".join(problems)
        + f"\n--- printed ---\n{actual}")


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- local AWS and Azure for the examples ------------------------------------------------------


@pytest.fixture
def aws_env(moto: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh AWS account on the moto server, with the AWS guide's queue and tables."""
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws import provision_aws

    monkeypatch.setenv("MOTO_ACCOUNT_ID", str(random.randrange(10**11, 10**12)))
    for key, value in moto.environment().items():
        monkeypatch.setenv(key, value)

    async def provision() -> str:
        session = get_session()
        async with session.create_client("sqs", region_name="us-east-1") as sqs, \
                session.create_client("dynamodb", region_name="us-east-1") as dynamodb:
            return str((await provision_aws(sqs, dynamodb))["queueUrl"])

    monkeypatch.setenv("SQS_QUEUE_URL", asyncio.run(provision()))
    for key in ("FLOWCRAFT_QUEUE_NAME", "FLOWCRAFT_CONTEXT_TABLE", "FLOWCRAFT_STATUS_TABLE",
                "FLOWCRAFT_COORDINATION_TABLE"):
        monkeypatch.delenv(key, raising=False)
    return dict(os.environ)


@pytest.fixture
def azure_env(azure_services_session: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The Azure guide's queue, database and containers, freshly created on the local services."""
    from azure.cosmos.aio import CosmosClient
    from azure.storage.queue.aio import QueueServiceClient

    from flowcraft.adapters.azure import provision_azure

    for key, value in azure_services_session.endpoints.environment().items():
        monkeypatch.setenv(key, value)
    for key in ("FLOWCRAFT_QUEUE_NAME", "FLOWCRAFT_COSMOS_DATABASE",
                "FLOWCRAFT_CONTEXT_CONTAINER", "FLOWCRAFT_STATUS_CONTAINER"):
        monkeypatch.delenv(key, raising=False)

    async def fresh() -> None:
        async with CosmosClient.from_connection_string(
            os.environ["COSMOS_DB_CONNECTION_STRING"], connection_verify=False
        ) as cosmos, QueueServiceClient.from_connection_string(
            os.environ["AZURE_STORAGE_CONNECTION_STRING"]
        ) as queues:
            with contextlib.suppress(Exception):
                await cosmos.delete_database("flowcraft-db")
            for name in ("flowcraft-jobs", "flowcraft-jobs-poison"):
                with contextlib.suppress(Exception):
                    await queues.delete_queue(name)
            await provision_azure(queues, cosmos)

    asyncio.run(fresh())
    return dict(os.environ)


# -- every python block ------------------------------------------------------------------------


@pytest.mark.timeout(BLOCK_TIME_LIMIT)
@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.name for b in PYTHON_BLOCKS])
def test_python_block(block: Block, request: pytest.FixtureRequest, in_tmp_dir: Path) -> None:
    if block.path.name == "aws.md":
        request.getfixturevalue("aws_env")
    elif block.path.name == "azure.md":
        request.getfixturevalue("azure_env")
    check_output(block, run_block(block))


def test_docs_have_python_examples() -> None:
    names = {block.path.name for block in PYTHON_BLOCKS}
    assert {"README.md", "guide.md", "aws.md", "azure.md"} <= names
    for block in ALL_BLOCKS:  # a typo in a fence would silently skip an example
        assert block.language in {"python", "python-notest", "bash", "hcl", "json", "text",
                                  "mermaid", "yaml", "toml", ""}, block.name


# -- scenario helpers --------------------------------------------------------------------------

ORDER = {"id": "ord-1", "customer": "ada", "country": "DE",
         "lines": [{"sku": "widget", "qty": 2}, {"sku": "gadget", "qty": 1}]}


def order_blueprint() -> Any:
    from flowcraft import load_blueprint
    from flowcraft.examples import EXAMPLES_DIR

    return load_blueprint(EXAMPLES_DIR / "order_pipeline.json")


def call(function: Any, *args: Any, timeout: float = 60) -> tuple[Any, str]:
    """Run an example's coroutine function to completion; return its result and output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = asyncio.run(asyncio.wait_for(function(*args), timeout))
    return result, buffer.getvalue()


class ScriptProcess:
    """An example run as a script (``python worker.py``), its output collected."""

    def __init__(self, block: Block, directory: Path) -> None:
        script = directory / f"example_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [PYTHON, str(script)], cwd=directory, env=dict(os.environ), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.process.poll() is None, f"the script exited:\n{self.output}"
            assert time.monotonic() < deadline, (
                f"no line {text!r} within {timeout}s:\n{self.output}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 45) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the script ignored SIGTERM:\n{self.output}") from None


@contextlib.contextmanager
def script_running(block: Block, directory: Path, ready: str) -> Iterator[ScriptProcess]:
    script = ScriptProcess(block, directory)
    try:
        script.wait_for_line(ready)
        yield script
    finally:
        code = script.terminate()
    assert code == 0, f"the script exited with {code}:\n{script.output}"


# -- AWS scenarios -----------------------------------------------------------------------------


async def aws_status(run_id: str) -> dict[str, Any]:
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws._dynamo import from_item

    async with get_session().create_client("dynamodb", region_name="us-east-1") as dynamodb:
        response = await dynamodb.get_item(TableName="flowcraft-statuses",
                                           Key={"runId": {"S": run_id}}, ConsistentRead=True)
    return from_item(response.get("Item") or {})


async def aws_context(run_id: str) -> dict[str, Any]:
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws import DynamoDbContext

    async with get_session().create_client("dynamodb", region_name="us-east-1") as dynamodb:
        return await DynamoDbContext(run_id, client=dynamodb,
                                     table_name="flowcraft-contexts").to_dict()


def wait_for_status(read_status: Any, run_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = asyncio.run(read_status(run_id))
        if status.get("status") not in (None, "running"):
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status} after {timeout}s"
        time.sleep(0.3)


async def take_all_messages(queue_url: str) -> list[dict[str, Any]]:
    """Receive and delete whatever is in the queue (a lost message, for the reconciler)."""
    from aiobotocore.session import get_session

    taken: list[dict[str, Any]] = []
    async with get_session().create_client("sqs", region_name="us-east-1") as sqs:
        while True:
            response = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                                 WaitTimeSeconds=0)
            messages = response.get("Messages", [])
            if not messages:
                return taken
            for message in messages:
                await sqs.delete_message(QueueUrl=queue_url,
                                         ReceiptHandle=message["ReceiptHandle"])
            taken.extend(messages)


async def backdate_aws_status(run_id: str, minutes: int) -> None:
    from datetime import UTC, datetime, timedelta

    from aiobotocore.session import get_session

    stamp = (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()
    async with get_session().create_client("dynamodb", region_name="us-east-1") as dynamodb:
        await dynamodb.update_item(
            TableName="flowcraft-statuses", Key={"runId": {"S": run_id}},
            UpdateExpression="SET lastUpdated = :t",
            ExpressionAttributeValues={":t": {"S": stamp}})


@pytest.mark.timeout(180)
def test_aws_worker_client_and_reconciler(aws_env: dict[str, str], in_tmp_dir: Path) -> None:
    """aws.md: the guide's client snippet starts a run; its job is lost; the reconciler finds the
    stalled run (ISO lastUpdated) and re-enqueues it; the worker script completes it; the
    adapter client (place_order) runs another order end to end; SIGTERM stops the worker."""
    client = load_module(block_defining("aws.md", "start_workflow"))
    reconciler = load_module(block_defining("aws.md", "reconcile"))
    ordering = load_module(block_defining("aws.md", "place_order"))
    worker = block_defining("aws.md", "main", containing="SqsAdapter(")
    blueprint = order_blueprint()

    run_id, printed = call(client.start_workflow, blueprint, {"order": ORDER})
    assert printed == f"Workflow {run_id} started.\n"
    lost = asyncio.run(take_all_messages(aws_env["SQS_QUEUE_URL"]))
    assert [json.loads(m["Body"])["nodeId"] for m in lost] == ["validate"]

    _, printed = call(reconciler.reconcile)
    # Updated just now: the status index returns only runs older than the threshold.
    assert printed == "Scanned 0 items, reconciled 0 runs.\n"
    asyncio.run(backdate_aws_status(run_id, minutes=10))
    _, printed = call(reconciler.reconcile)
    assert printed == "Scanned 1 items, reconciled 1 runs.\n"

    with script_running(worker, in_tmp_dir, "Flowcraft worker with SQS adapter is running..."):
        status = wait_for_status(aws_status, run_id)
        assert status["status"] == "completed" and status["finalStatus"] == "completed"
        context = asyncio.run(aws_context(run_id))
        assert context["order"] == ORDER
        assert context["_outputs.notify"].startswith("customer notified")

        result, printed = call(ordering.place_order, {**ORDER, "id": "ord-2"})
        assert re.fullmatch(r"run \S+ is running\n", printed)
        assert result.status == "completed", result.errors
        assert result.context["_outputs.validate"]["id"] == "ord-2"


@pytest.mark.timeout(120)
def test_aws_lambda_handler(aws_env: dict[str, str], in_tmp_dir: Path) -> None:
    """aws.md: the Lambda handler, fed SQS events built from the real queue, completes a run."""
    lambda_module = load_module(block_defining("aws.md", "handler"))
    client = load_module(block_defining("aws.md", "start_workflow"))
    run_id, _ = call(client.start_workflow, order_blueprint(), {"order": ORDER})
    queue_url = aws_env["SQS_QUEUE_URL"]

    async def deliver() -> int:
        from aiobotocore.session import get_session

        invocations = 0
        async with get_session().create_client("sqs", region_name="us-east-1") as sqs:
            while (await aws_status(run_id)).get("status") == "running":
                response = await sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                                     WaitTimeSeconds=0)
                messages = response.get("Messages", [])
                if not messages:
                    await asyncio.sleep(0.1)
                    continue
                event = {"Records": [{"messageId": m["MessageId"], "body": m["Body"],
                                      "eventSource": "aws:sqs"} for m in messages]}
                reply = await asyncio.to_thread(lambda_module.handler, event, None)
                invocations += 1
                failed = {item["itemIdentifier"] for item in reply["batchItemFailures"]}
                for message in messages:
                    if message["MessageId"] not in failed:
                        await sqs.delete_message(QueueUrl=queue_url,
                                                 ReceiptHandle=message["ReceiptHandle"])
        return invocations

    assert asyncio.run(asyncio.wait_for(deliver(), 90)) >= 1
    assert asyncio.run(aws_status(run_id))["status"] == "completed"


# -- Azure scenarios ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cosmos_container(name: str) -> Any:
    from azure.cosmos.aio import CosmosClient

    async with CosmosClient.from_connection_string(
        os.environ["COSMOS_DB_CONNECTION_STRING"], connection_verify=False
    ) as cosmos:
        yield cosmos.get_database_client("flowcraft-db").get_container_client(name)


async def azure_status(run_id: str) -> dict[str, Any]:
    """The run's status item, whatever its partition (TypeScript clients write no runId)."""
    async with cosmos_container("statuses") as statuses:
        found = [item async for item in statuses.query_items(
            "SELECT * FROM c WHERE c.id = @id", parameters=[{"name": "@id", "value": run_id}])]
    return found[0] if found else {}


async def azure_context(run_id: str) -> dict[str, Any]:
    from azure.cosmos.aio import CosmosClient

    from flowcraft.adapters.azure import CosmosDbContext

    async with CosmosClient.from_connection_string(
        os.environ["COSMOS_DB_CONNECTION_STRING"], connection_verify=False
    ) as cosmos:
        return await CosmosDbContext(run_id, client=cosmos, database_name="flowcraft-db",
                                     container_name="contexts").to_dict()


async def backdate_azure_status(run_id: str, minutes: int) -> None:
    from datetime import UTC, datetime, timedelta

    stamp = (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()
    async with cosmos_container("statuses") as statuses:
        await statuses.patch_item(run_id, partition_key=run_id, patch_operations=[
            {"op": "set", "path": "/lastUpdated", "value": stamp}])


async def take_azure_messages() -> list[str]:
    """Receive and delete every visible job message; returns their texts."""
    from azure.storage.queue.aio import QueueClient

    texts: list[str] = []
    async with QueueClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], "flowcraft-jobs"
    ) as queue:
        async for message in queue.receive_messages(messages_per_page=32, visibility_timeout=60):
            texts.append(message.content)
            await queue.delete_message(message)
    return texts


def job_of(text: str) -> dict[str, Any]:
    import base64

    return dict(json.loads(text if text.lstrip().startswith("{") else base64.b64decode(text)))


@pytest.mark.timeout(180)
def test_azure_worker_clients_and_reconciler(azure_env: dict[str, str], in_tmp_dir: Path) -> None:
    """azure.md: a run started by the SDK client loses its job; the reconciler re-enqueues it;
    the worker script completes it, a run started TypeScript-style (flat items, plain JSON)
    and one started by the adapter client (place_order); SIGTERM stops the worker."""
    client = load_module(block_defining("azure.md", "start_workflow"))
    typescript_style = load_module(block_defining("azure.md", "start_workflow_like_typescript"))
    ordering = load_module(block_defining("azure.md", "place_order"))
    reconciler = load_module(block_defining("azure.md", "reconcile"))
    worker = block_defining("azure.md", "main", containing="AzureQueueAdapter(")
    blueprint = order_blueprint()

    run_id, printed = call(client.start_workflow, blueprint, {"order": ORDER})
    assert printed == f"Workflow {run_id} started.\n"
    lost = asyncio.run(take_azure_messages())
    assert [job_of(text)["nodeId"] for text in lost] == ["validate"]

    _, printed = call(reconciler.reconcile)
    assert printed == "Reconciled 0 of 0 stalled runs.\n"  # updated just now: not stalled
    asyncio.run(backdate_azure_status(run_id, minutes=10))
    _, printed = call(reconciler.reconcile)
    assert printed == "Reconciled 1 of 1 stalled runs.\n"

    with script_running(worker, in_tmp_dir, "Flowcraft worker with Azure adapter is running..."):
        status = wait_for_status(azure_status, run_id)
        assert status["status"] == "completed" and status["finalStatus"] == "completed"
        context = asyncio.run(azure_context(run_id))
        assert context["order"] == ORDER
        assert context["_outputs.notify"].startswith("customer notified")

        flat_run, _ = call(typescript_style.start_workflow_like_typescript, blueprint,
                           {"order": {**ORDER, "id": "ord-ts"}})
        assert wait_for_status(azure_status, flat_run)["status"] == "completed"
        assert asyncio.run(azure_context(flat_run))["_outputs.validate"]["id"] == "ord-ts"

        result, printed = call(ordering.place_order, {**ORDER, "id": "ord-2"})
        assert re.fullmatch(r"run \S+ is running\n", printed)
        assert result.status == "completed", result.errors
        assert result.context["_outputs.validate"]["id"] == "ord-2"


@pytest.mark.timeout(120)
def test_azure_handle_job(azure_env: dict[str, str], in_tmp_dir: Path) -> None:
    """azure.md: on_queue_message, fed the queue's messages as a Functions trigger would
    (decoded text), completes a run."""
    handler = load_module(block_defining("azure.md", "on_queue_message"))
    client = load_module(block_defining("azure.md", "start_workflow"))
    run_id, _ = call(client.start_workflow, order_blueprint(), {"order": ORDER})

    async def deliver() -> list[str]:
        from azure.storage.queue.aio import QueueClient

        outcomes: list[str] = []
        async with QueueClient.from_connection_string(
            os.environ["AZURE_STORAGE_CONNECTION_STRING"], "flowcraft-jobs"
        ) as queue:
            while (await azure_status(run_id)).get("status") == "running":
                received = [message async for message in queue.receive_messages(
                    messages_per_page=32, visibility_timeout=30)]
                if not received:
                    await asyncio.sleep(0.1)
                    continue
                for message in received:
                    text = json.dumps(job_of(message.content))  # what a trigger hands you
                    try:
                        outcomes.append(await handler.on_queue_message(text))
                    except handler.NodeBusy:
                        continue  # stays in the queue; visible again later
                    await queue.delete_message(message)
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(deliver(), 90))
    assert "processed" in outcomes
    assert asyncio.run(azure_status(run_id))["status"] == "completed"


# -- docs/cli.md -------------------------------------------------------------------------------

CLI_DOC = DOCS / "cli.md"


def documented_output(command: str) -> str | None:
    """The ```text block that follows the ```bash block holding exactly this command."""
    blocks = parse_blocks(CLI_DOC)
    for index, block in enumerate(blocks):
        if block.language == "bash" and command in block.code.splitlines():
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            return following.code if following and following.language == "text" else None
    raise AssertionError(f"docs/cli.md does not show the command: {command}")


def flowcraft(command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a documented ``flowcraft ...`` command line (as ``python -m flowcraft``)."""
    import shlex

    documented_output(command)
    argv = shlex.split(command)
    assert argv[0] == "flowcraft"
    return subprocess.run([PYTHON, "-m", "flowcraft", *argv[1:]], cwd=REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def same_text(documented: str, actual: str) -> bool:
    """Line by line; ``...`` matches anything; durations (``0.23s``) may differ."""
    def normal(text: str) -> list[str]:
        return [re.sub(r"\d+\.\d+s\b", "#s", line.rstrip()) for line in
                text.rstrip("\n").split("\n")]

    want, have = normal(documented), normal(actual)
    return len(want) == len(have) and all(
        re.fullmatch(".*".join(re.escape(part) for part in w.split("...")), h)
        for w, h in zip(want, have, strict=True))


IN_MEMORY_COMMANDS = [
    ("flowcraft run examples/hello.json --registry examples/hello.py:registry "
     "--context '{\"name\": \"Ada\"}'", 0, "stdout"),
    ("flowcraft run examples/hello.json", 2, "stderr"),
    ("flowcraft graph examples/hello.json", 0, "stdout"),
    ("flowcraft validate examples/hello.json --registry examples/hello.py:registry", 0, "stdout"),
    ("flowcraft demo --backend memory --orders 3", 0, "stdout"),
]


@pytest.mark.parametrize(("command", "status", "stream"), IN_MEMORY_COMMANDS,
                         ids=[c[0].split(" --")[0] for c in IN_MEMORY_COMMANDS])
def test_cli_in_memory_commands(command: str, status: int, stream: str) -> None:
    completed = flowcraft(command)
    output = getattr(completed, stream)
    assert completed.returncode == status, completed.stdout + completed.stderr
    documented = documented_output(command)
    assert documented is not None
    assert same_text(documented, output), f"documented:\n{documented}\nprinted:\n{output}"


@pytest.mark.timeout(150)
def test_cli_aws_commands(aws_env: dict[str, str]) -> None:
    """cli.md on the local moto server: provision, worker, start --wait, status, reconcile."""
    provision = flowcraft("flowcraft provision aws")
    assert provision.returncode == 0, provision.stderr
    assert provision.stdout.startswith("provisioned aws: everything already existed\n")
    assert re.search(r"queueUrl: http://127\.0\.0\.1:\d+/\d+/flowcraft-jobs", provision.stdout)

    worker_command = ("flowcraft worker aws --registry flowcraft.examples.orders:registry "
                      "--blueprints src/flowcraft/examples")
    documented_output(worker_command)
    worker = subprocess.Popen(
        [PYTHON, "-m", "flowcraft", *worker_command.split()[1:]], cwd=REPO,
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        start = flowcraft(
            "flowcraft start aws order-pipeline --blueprints src/flowcraft/examples --context "
            "'{\"order\": {\"id\": \"ord-7\", \"lines\": [{\"sku\": \"gizmo\", \"qty\": 1}]}}' "
            "--run-id ord-7 --wait")
        assert start.returncode == 0, start.stdout + start.stderr
        run_id, _, body = start.stdout.partition("\n")
        assert run_id == "ord-7"
        result = json.loads(body)
        assert result["status"] == "completed"
        assert result["context"]["_outputs.notify"] == "customer notified: charged (34.99 EUR)"
    finally:
        worker.send_signal(signal.SIGINT)
        printed, _ = worker.communicate(timeout=45)
    assert worker.returncode == 0, printed
    assert printed.startswith("flowcraft worker (aws) "), printed
    assert "flowcraft worker: service calls {" in printed

    status = flowcraft("flowcraft status aws ord-7")
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)["status"]
    assert {k: record[k] for k in ("runId", "status", "blueprintId", "finalStatus")} == {
        "runId": "ord-7", "status": "completed", "blueprintId": "order-pipeline",
        "finalStatus": "completed"}

    runs = flowcraft("flowcraft runs aws --status completed")
    assert runs.returncode == 0, runs.stderr
    assert same_text(documented_output("flowcraft runs aws --status completed") or "",
                     runs.stdout), runs.stdout

    reconcile_command = ("flowcraft reconcile aws --blueprints src/flowcraft/examples "
                         "--registry flowcraft.examples.orders:registry")
    reconcile = flowcraft(reconcile_command)
    assert reconcile.returncode == 0, reconcile.stderr
    assert same_text(documented_output(reconcile_command) or "", reconcile.stdout)


# -- links between the pages -------------------------------------------------------------------


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.name for p in DOC_FILES])
def test_links_between_pages_resolve(path: Path) -> None:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    for target, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", text):
        linked = (path.parent / target) if target else path
        assert linked.is_file(), f"{path.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(linked), f"{path.name}: no heading #{anchor} in {linked.name}"
