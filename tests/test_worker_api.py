"""The Worker API over the in-process backend: dependencies reach nodes, hooks run in order
around polling, dependency factories of every kind, signals, and typed adapter options."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from distributed_helpers import wait_until
from flowcraft import Flow, NodeContext
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.distributed.inprocess import InProcessAdapter
from flowcraft.distributed.options import WORKER_OPTION_NAMES, WorkerOptions
from flowcraft.runtime.runtime import FlowRuntime
from flowcraft.worker import Worker


class Pool:
    def __init__(self) -> None:
        self.open = True
        self.queries: list[str] = []

    async def query(self, text: str) -> str:
        assert self.open, "the pool was closed while a node used it"
        self.queries.append(text)
        return f"rows for {text}"


async def lookup(ctx: NodeContext) -> Any:
    return await ctx.dependencies["pool"].query(ctx.dependencies.get("table", "orders"))


def flow_and_adapter(**options: Any) -> tuple[Any, InProcessAdapter]:
    flow = Flow("deps").node("lookup", lookup)
    runtime = FlowRuntime(blueprints={"deps": flow.to_blueprint()}, registry=flow.registry())
    return flow, InProcessAdapter(runtime.options, **options)


async def test_startup_hook_adds_a_dependency_nodes_use_and_shutdown_closes_it() -> None:
    events: list[str] = []
    pool = Pool()

    async def open_pool(deps: dict[str, Any]) -> None:
        events.append(f"startup sees {sorted(deps)}")
        deps["pool"] = pool

    def name_table(deps: dict[str, Any]) -> None:  # a plain function is a hook too
        events.append("second startup hook")
        deps["table"] = "invoices"

    async def close_pool(deps: dict[str, Any]) -> None:
        events.append("close pool")
        deps["pool"].open = False

    _, adapter = flow_and_adapter()
    worker = Worker(adapter, dependencies={"region": "eu"}, on_startup=[open_pool, name_table],
                    on_shutdown=[close_pool, lambda deps: events.append("last hook first")])
    async with worker:
        assert worker.dependencies is adapter.runtime_options.dependencies
        run_id = await adapter.start_workflow("deps", {})
        result = await adapter.wait_for_result(run_id, timeout=10)
        assert pool.open
    assert result.status == "completed", result.errors
    assert result.context["_outputs.lookup"] == "rows for invoices"
    assert events == ["startup sees ['region']", "second startup hook", "last hook first",
                      "close pool"]
    assert not pool.open
    assert adapter.worker_loop.poll_task is not None and adapter.worker_loop.poll_task.done()


async def test_shutdown_hooks_run_after_running_jobs_finish() -> None:
    finished = asyncio.Event()
    seen: list[str] = []

    async def slow(ctx: NodeContext) -> str:
        await asyncio.sleep(0.5)
        finished.set()
        return "done"

    flow = Flow("slow").node("s", slow)
    runtime = FlowRuntime(blueprints={"slow": flow.to_blueprint()}, registry=flow.registry())
    adapter = InProcessAdapter(runtime.options)
    worker = Worker(adapter, on_shutdown=[
        lambda deps: seen.append(f"job finished: {finished.is_set()}")])
    async with worker:
        run_id = await adapter.start_workflow("slow", {})
        await asyncio.sleep(0.3)  # the job is running now
    assert seen == ["job finished: True"]
    assert (await adapter.get_run_status(run_id) or {})["status"] == "completed"


@pytest.mark.parametrize("kind", ["mapping", "function", "coroutine", "context manager"])
async def test_dependency_factories_of_every_kind(kind: str) -> None:
    exited: list[bool] = []

    def function() -> dict[str, Any]:
        return {"pool": Pool()}

    async def coroutine() -> dict[str, Any]:
        return {"pool": Pool()}

    @contextlib.asynccontextmanager
    async def context_manager() -> AsyncIterator[dict[str, Any]]:
        pool = Pool()
        yield {"pool": pool}
        pool.open = False
        exited.append(True)

    sources: dict[str, Any] = {"mapping": {"pool": Pool()}, "function": function,
                               "coroutine": coroutine, "context manager": context_manager}
    _, adapter = flow_and_adapter()
    async with Worker(adapter, dependencies=sources[kind]):
        run_id = await adapter.start_workflow("deps", {})
        result = await adapter.wait_for_result(run_id, timeout=10)
    assert result.context["_outputs.lookup"] == "rows for orders"
    assert exited == ([True] if kind == "context manager" else [])


async def test_a_factory_that_returns_no_mapping_is_refused_clearly() -> None:
    _, adapter = flow_and_adapter()
    with pytest.raises(TypeError, match=r"dependency factory .*gave list.*mapping"):
        await Worker(adapter, dependencies=lambda: [1, 2]).start()
    assert adapter.worker_loop.poll_task is None  # nothing started


async def test_a_failing_startup_hook_stops_the_start_and_leaves_the_factory() -> None:
    left: list[bool] = []

    @contextlib.asynccontextmanager
    async def resources() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            left.append(True)

    def broken(deps: dict[str, Any]) -> None:
        raise RuntimeError("database unreachable")

    shutdown: list[str] = []
    _, adapter = flow_and_adapter()
    worker = Worker(adapter, dependencies=resources, on_startup=[broken],
                    on_shutdown=[lambda deps: shutdown.append("ran")])
    with pytest.raises(RuntimeError, match="database unreachable"):
        async with worker:
            pass
    assert left == [True] and shutdown == [] and adapter.worker_loop.poll_task is None


async def test_a_failing_shutdown_hook_does_not_stop_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken(deps: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    _, adapter = flow_and_adapter()
    async with Worker(adapter, on_shutdown=[lambda deps: ran.append("first"), broken]):
        pass
    assert ran == ["first"]
    assert "shutdown hook" in caplog.text and "boom" in caplog.text


def test_hooks_and_adapters_are_checked_when_the_worker_is_made() -> None:
    _, adapter = flow_and_adapter()
    with pytest.raises(TypeError, match="on_startup holds 'pool', which is not callable"):
        Worker(adapter, on_startup=["pool"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="needs runtime_options"):
        Worker(lambda: contextlib.nullcontext(adapter))  # type: ignore[arg-type,return-value]


async def test_run_stops_gracefully_on_sigterm_and_reports() -> None:
    said: list[str] = []
    _, adapter = flow_and_adapter()
    worker = Worker(adapter, dependencies={"pool": Pool()}, name="local", announce=said.append)

    async def send_sigterm() -> None:
        await wait_until(lambda: bool(said))
        os.kill(os.getpid(), signal.SIGTERM)

    killer = asyncio.get_running_loop().create_task(send_sigterm())
    await asyncio.wait_for(worker.run(), 10)
    await killer
    assert said[0].startswith(f"flowcraft worker (local) {adapter.worker_id}: 1 blueprint(s), "
                              "concurrency 8")
    assert said[1].startswith("flowcraft worker: stopping")
    assert adapter.worker_loop.poll_task is not None and adapter.worker_loop.poll_task.done()
    # The handlers are removed again: the default SIGTERM handling is back.
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.default_int_handler)


async def test_a_second_signal_quits_without_waiting_for_running_jobs() -> None:
    said: list[str] = []
    closed: list[str] = []

    async def forever(ctx: NodeContext) -> None:
        await asyncio.sleep(60)

    flow = Flow("stuck").node("s", forever)
    runtime = FlowRuntime(blueprints={"stuck": flow.to_blueprint()}, registry=flow.registry())
    adapter = InProcessAdapter(runtime.options, shutdown_timeout_seconds=30)
    worker = Worker(adapter, announce=said.append,
                    on_shutdown=[lambda deps: closed.append("shutdown hook")])

    async def signal_twice() -> None:
        await wait_until(lambda: bool(said))
        await adapter.start_workflow("stuck", {})
        await wait_until(lambda: bool(adapter.worker_loop.jobs))
        os.kill(os.getpid(), signal.SIGINT)
        await wait_until(lambda: len(said) >= 2)
        os.kill(os.getpid(), signal.SIGINT)

    helper = asyncio.get_running_loop().create_task(signal_twice())
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(worker.run(), 10)
    await helper
    assert asyncio.get_running_loop().time() - started < 5
    assert said[-1] == "flowcraft worker: stopped without waiting"
    assert closed == ["shutdown hook"]  # what was opened is still closed


async def test_request_stop_ends_run_outside_the_main_thread_style() -> None:
    _, adapter = flow_and_adapter()
    worker = Worker(adapter)
    task = asyncio.get_running_loop().create_task(worker.run(handle_signals=False))
    await asyncio.sleep(0.1)
    worker.request_stop()
    await asyncio.wait_for(task, 5)


# -- typed options -----------------------------------------------------------------------------


def test_worker_options_name_every_keyword_of_the_base_adapter() -> None:
    keywords = {name for name, parameter in
                inspect.signature(BaseDistributedAdapter.__init__).parameters.items()
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == WORKER_OPTION_NAMES


def test_a_misspelt_option_is_a_type_error_naming_it_and_the_valid_ones() -> None:
    runtime = FlowRuntime(blueprints={}, registry={})
    with pytest.raises(TypeError) as caught:
        InProcessAdapter(runtime.options, concurency=4)  # type: ignore[call-arg]
    message = str(caught.value)
    assert "InProcessAdapter got an unknown option 'concurency'" in message
    assert "did you mean 'concurrency'?" in message
    assert "lease_seconds" in message and "queue" in message


def test_typed_options_are_passed_through() -> None:
    runtime = FlowRuntime(blueprints={}, registry={})
    options = WorkerOptions(concurrency=3, lease_seconds=12.5, worker_id="w-1")
    adapter = InProcessAdapter(runtime.options, **options)
    assert (adapter.concurrency, adapter.lease_seconds, adapter.worker_id) == (3, 12.5, "w-1")


def test_options_and_knobs_set_on_an_adapter_reach_its_parts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = FlowRuntime(blueprints={}, registry={})
    adapter = InProcessAdapter(runtime.options, lease_seconds=3)
    adapter.lease_seconds = 7
    adapter.max_delay_seconds = 1.5
    assert adapter.algorithm.settings.lease_seconds == 7
    assert adapter.worker_loop.settings.lease_seconds == 7
    assert adapter.backend.queue.max_delay_seconds == 1.5
    assert InProcessAdapter(runtime.options).backend.queue.max_delay_seconds == 900

    class ShortDelays(InProcessAdapter):
        max_delay_seconds = 2.0  # a plain class attribute, as a subclass may set it

    assert ShortDelays(runtime.options).backend.queue.max_delay_seconds == 2.0

    from flowcraft.adapters.aws import SqsAdapter
    from flowcraft.distributed import InMemoryCoordinationStore

    def sqs_adapter() -> SqsAdapter:  # the clients are not used until it runs
        return SqsAdapter(runtime.options, InMemoryCoordinationStore(), object(), object(),
                          "https://sqs.invalid/queue")

    assert sqs_adapter().backend.statuses.retention_seconds == 30 * 24 * 3600  # type: ignore[attr-defined]
    monkeypatch.setattr(SqsAdapter, "retention_seconds", None)  # as the AWS guide says
    kept = sqs_adapter()
    assert kept.retention_seconds is None
    assert kept.backend.statuses.retention_seconds is None  # type: ignore[attr-defined]


def test_from_env_refuses_unknown_options_and_backends() -> None:
    with pytest.raises(TypeError, match=r"unknown option 'lease'.*did you mean 'lease_seconds'"):
        Worker.from_env("aws", registry={}, blueprints={}, lease=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="unknown backend 'gcp'"):
        Worker.from_env("gcp", registry={}, blueprints={})  # type: ignore[arg-type]


def test_a_misspelt_or_mistyped_option_is_a_type_checker_error(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    from mypy import api

    usage = tmp_path / "usage.py"
    usage.write_text(
        "from typing import Any\n"
        "from flowcraft.adapters.aws import SqsAdapter\n"
        "from flowcraft.adapters.azure import AzureQueueAdapter\n"
        "from flowcraft.distributed import InProcessAdapter, WorkerOptions\n"
        "from flowcraft.runtime.runtime import FlowRuntime\n"
        "options = FlowRuntime().options\n"
        "store: Any = None\n"
        "InProcessAdapter(options, concurency=4)\n"
        "InProcessAdapter(options, concurrency='4')\n"
        "SqsAdapter(options, store, None, None, 'url', lease_second=3)\n"
        "AzureQueueAdapter(options, store, None, None, max_recieve_count=3)\n"
        "InProcessAdapter(options, **WorkerOptions(concurrency=4, lease_seconds=2.5))\n"
        "SqsAdapter(options, store, None, None, 'url', context_table_name='t', batch_size=5)\n")
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).resolve().parents[1] / "src"))
    stdout, _, _ = api.run([str(usage), "--cache-dir", str(tmp_path / "cache"),
                            "--ignore-missing-imports", "--no-error-summary"])
    errors = sorted(line.split(": error: ")[0].rsplit(":", 1)[1] + ": " +
                    line.split(": error: ")[1].split("  [")[0]
                    for line in stdout.splitlines()
                    if line.startswith(str(usage)) and ": error: " in line)
    assert errors == [
        '10: Unexpected keyword argument "lease_second" for "SqsAdapter"; did you mean '
        '"lease_seconds"?',
        '11: Unexpected keyword argument "max_recieve_count" for "AzureQueueAdapter"; '
        'did you mean "max_receive_count"?',
        '8: Unexpected keyword argument "concurency" for "InProcessAdapter"; did you mean '
        '"concurrency"?',
        '9: Argument "concurrency" to "InProcessAdapter" has incompatible type "str"; '
        'expected "int"',
    ], stdout


async def test_every_adapter_still_takes_an_event_bus_by_keyword(aws: Any, azure: Any) -> None:
    from flowcraft import InMemoryEventBus
    from flowcraft.adapters.aws import SqsAdapter
    from flowcraft.adapters.azure import AzureQueueAdapter
    from flowcraft.distributed import InMemoryCoordinationStore

    runtime = FlowRuntime()
    bus = InMemoryEventBus()
    assert InProcessAdapter(runtime.options, event_bus=bus).event_bus is bus
    sqs = SqsAdapter(runtime.options, InMemoryCoordinationStore(), aws.sqs, aws.dynamodb,
                     aws.queue_url, event_bus=bus)
    assert sqs.event_bus is bus
    queue = AzureQueueAdapter(runtime.options, InMemoryCoordinationStore(), azure.queue,
                              azure.cosmos, azure.database, event_bus=bus)
    assert queue.event_bus is bus


async def test_hooks_given_as_a_generator_all_run() -> None:
    ran: list[str] = []
    _, adapter = flow_and_adapter()
    hooks = (lambda deps, n=n: ran.append(f"start {n}") for n in (1, 2))
    async with Worker(adapter, on_startup=hooks):
        pass
    assert ran == ["start 1", "start 2"]


def test_every_worker_option_is_a_resolved_setting() -> None:
    """``WorkerOptions`` (what callers may pass) and ``WorkerSettings`` (what the parts read)
    name the same options: a new option added to one only is caught here."""
    import dataclasses

    from flowcraft.distributed.options import WORKER_OPTION_NAMES, WorkerSettings

    assert {f.name for f in dataclasses.fields(WorkerSettings)} == WORKER_OPTION_NAMES
