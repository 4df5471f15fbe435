"""``flowcraft demo``: the example order pipeline, run end to end.

``aws-local`` (the default) starts a moto server (SQS + DynamoDB) inside
this process, provisions the queue and tables exactly as ``flowcraft
provision aws`` does, starts worker processes (``flowcraft worker aws``),
starts one run per order, shows each run finishing, and prints the results
and the number of SQS and DynamoDB requests the workers made.
``azure-local`` does the same on Azurite, a local Cosmos DB server and Redis;
``memory`` runs every order in this process.

The workers' request counts come through their API, not their output: each
worker serves ``/stats`` on a health port the demo chose for it, and the demo
reads every worker's ``serviceRequests`` there before stopping it.

The local backends need extras a bare ``pip install flowcraft-py`` lacks
(:data:`EXTRAS`: ``aws`` and ``local`` for the moto server, ``azure`` for the
Azure SDKs). Without them the default backend says so in one line on
standard error and the demo runs in memory instead; a backend asked for by
name says so and exits with status 2. A local service that cannot start
(:class:`~flowcraft.local.LocalServiceError`: the npm emulators or
``redis-server`` missing) is one line too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..examples import EXAMPLES_DIR
from .common import UsageError

if TYPE_CHECKING:
    from ..events import FlowcraftEvent

DEMO_BLUEPRINT = EXAMPLES_DIR / "order_pipeline.json"
REGISTRY_SPEC = "flowcraft.examples.orders:registry"
DEMO_BACKENDS = ["aws-local", "memory", "azure-local"]
DEFAULT_DEMO_BACKEND = "aws-local"

EXTRAS: dict[str, dict[str, str]] = {
    "aws-local": {"aiobotocore": "aws", "moto": "local", "flask": "local",
                  "flask_cors": "local"},
    "azure-local": {"azure.storage.queue": "azure", "azure.cosmos": "azure",
                    "aiohttp": "azure", "redis": "azure"},
}
"""For each local backend, the modules it imports and the extra that brings each."""


def missing_extras(backend: str) -> list[str]:
    """The extras ``backend`` needs that are not installed (none for ``memory``)."""
    missing: list[str] = []
    for module, extra in EXTRAS.get(backend, {}).items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing
            found = False
        if not found and extra not in missing:
            missing.append(extra)
    return missing


def extras_line(backend: str, missing: Sequence[str]) -> str:
    """``the aws-local demo needs the aws and local extras: pip install ...``"""
    names = " and ".join(missing)
    plural = "extras" if len(missing) > 1 else "extra"
    return (f"the {backend} demo needs the {names} {plural}: "
            f"pip install \"flowcraft-py[{','.join(missing)}]\"")


def cmd_demo(args: argparse.Namespace) -> int:
    backend = args.backend or DEFAULT_DEMO_BACKEND
    missing = missing_extras(backend)
    if missing and args.backend is None and not args.ui:
        print(f"flowcraft demo: {extras_line(backend, missing)}; running it in memory "
              "instead", file=sys.stderr, flush=True)
        backend = "memory"
    elif missing:
        raise UsageError(extras_line(backend, missing))
    from ..local import LocalServiceError

    try:
        return run_demo(backend=backend, orders=args.orders, workers=args.workers, ui=args.ui)
    except LocalServiceError as exc:
        raise UsageError(str(exc)) from None


def run_demo(backend: str = "aws-local", orders: int = 6, workers: int = 3,
             ui: bool = False) -> int:
    if backend == "memory":
        if ui:
            print("flowcraft demo: --ui shows stored runs; use --backend aws-local or azure-local",
                  file=sys.stderr)
            return 2
        return asyncio.run(_memory_demo(orders))
    if backend == "aws-local":
        return _aws_demo(orders, workers, ui)
    if backend == "azure-local":
        return _azure_demo(orders, workers, ui)
    raise ValueError(f"unknown demo backend {backend!r}")


# -- in memory -----------------------------------------------------------------------------------


async def _memory_demo(order_count: int) -> int:
    from ..blueprint import load_blueprint
    from ..events import InMemoryEventBus
    from ..examples.orders import registry, sample_orders
    from ..runtime import FlowRuntime

    blueprint = load_blueprint(DEMO_BLUEPRINT)
    bus = InMemoryEventBus(keep_history=False)
    finished: Counter[str] = Counter()

    def progress(event: FlowcraftEvent) -> None:
        finished[event.payload["runId"]] += 1

    bus.subscribe(progress, "node:finish")
    runtime = FlowRuntime(registry=registry, event_bus=bus)
    print(f"flowcraft demo: {order_count} orders through '{blueprint.id}', in this process")
    started = time.perf_counter()
    results = await asyncio.gather(*(
        runtime.run(blueprint, {"order": order}, run_id=order["id"])
        for order in sample_orders(order_count)
    ))
    elapsed = time.perf_counter() - started
    for result in results:
        _print_run(result.run_id, result.status, result.context, finished[result.run_id],
                   [e.message for e in result.errors])
    return _summary([r.status for r in results], sum(finished.values()), elapsed)


# -- distributed, on local services --------------------------------------------------------------


def _aws_demo(order_count: int, worker_count: int, ui: bool = False) -> int:
    from ..adapters.connect import AwsSettings, aws_adapter, provision
    from ..local import moto_server

    print("flowcraft demo: starting a local AWS (moto: SQS + DynamoDB) in this process ...",
          flush=True)
    with moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="flowcraft-") as scratch:
        os.environ.update(endpoint.environment())
        settings = AwsSettings.resolve(endpoint_url=endpoint.url)

        async def provision_services() -> list[str]:
            return list((await provision(settings))["created"])

        return _distributed_demo("aws", settings, aws_adapter, provision_services,
                                 dict(os.environ), order_count, worker_count, Path(scratch), ui)


def _azure_demo(order_count: int, worker_count: int, ui: bool = False) -> int:
    from ..adapters.connect import AzureSettings, azure_adapter, provision
    from ..local import azure_services

    print("flowcraft demo: starting local Azure services (Azurite queues, a Cosmos DB server, "
          "Redis) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="flowcraft-") as scratch, azure_services(
        Path(scratch)
    ) as services:
        os.environ.update(services.endpoints.environment())
        settings = AzureSettings.resolve()

        async def provision_services() -> list[str]:
            return list((await provision(settings))["created"])

        return _distributed_demo("azure", settings, azure_adapter, provision_services,
                                 dict(os.environ), order_count, worker_count, Path(scratch), ui)


def _distributed_demo(backend: str, settings: Any, adapter_factory: Any, provision: Any,
                      env: dict[str, str], order_count: int, worker_count: int,
                      scratch: Path, ui: bool = False) -> int:
    from ..blueprint import load_blueprint
    from ..local import free_port
    from ..runtime import FlowRuntime

    print(f"  provisioned: {', '.join(asyncio.run(provision())) or 'already there'}",
          flush=True)
    command = [sys.executable, "-m", "flowcraft", "worker", backend, "--registry",
               REGISTRY_SPEC, "--blueprints", str(EXAMPLES_DIR), "--concurrency", "8",
               "--poll-seconds", "5"]  # a stopping worker waits for its open receive
    health_ports = [free_port() for _ in range(worker_count)]
    workers = _start_workers(command, env, health_ports, scratch)
    processes = list(workers)
    if ui:  # the run view, in a process of its own like the workers; stopped last
        processes.insert(0, subprocess.Popen([sys.executable, "-m", "flowcraft", "ui", backend,
                                              "--blueprints", str(EXAMPLES_DIR)], env=env))
        time.sleep(1.5)  # let it print its address before the runs start
    blueprint = load_blueprint(DEMO_BLUEPRINT)
    options = FlowRuntime(blueprints={blueprint.id: blueprint}).options

    async def drive() -> tuple[list[str], int, float]:
        async with adapter_factory(settings, options) as client:
            return await _drive(client, blueprint, order_count)

    try:
        statuses, executed, elapsed = asyncio.run(drive())
        calls, silent = _worker_requests(workers, health_ports)
    except BaseException:
        _stop_workers(processes)
        raise
    _stop_workers(workers)
    code = _summary(statuses, executed, elapsed)
    total = sum(calls.values())
    if total and executed:
        detail = ", ".join(f"{name} {count}" for name, count in calls.most_common())
        print(f"service requests made by the {worker_count} workers: {total} for {executed} "
              f"node executions = {total / executed:.2f} per node (idle polling included)\n"
              f"  ({detail})")
    if silent:
        print(f"flowcraft demo: {silent} of the {worker_count} workers did not answer on "
              "/stats; their requests are not counted", file=sys.stderr)
    if ui:
        print("\nthe run view stays at http://127.0.0.1:8080/ ; Ctrl-C ends the demo", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            processes[0].wait()
        _stop_workers(processes[:1])
    return code


def _worker_requests(workers: Sequence[subprocess.Popen[bytes]],
                     health_ports: Sequence[int]) -> tuple[Counter[str], int]:
    """The service requests the workers made so far, summed from each one's ``GET /stats``
    (``serviceRequests``), and how many workers did not answer. A worker still starting is
    given a few seconds."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    calls: Counter[str] = Counter()
    silent = 0
    for process, port in zip(workers, health_ports, strict=True):
        deadline = time.monotonic() + 10
        while True:
            try:
                with opener.open(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
                    calls.update(json.load(response)["serviceRequests"])
                break
            except (OSError, ValueError, KeyError):
                if process.poll() is not None or time.monotonic() > deadline:
                    silent += 1
                    break
                time.sleep(0.2)
    return calls, silent


# -- shared --------------------------------------------------------------------------------------


def _start_workers(command: Sequence[str], env: dict[str, str], health_ports: Sequence[int],
                   scratch: Path) -> list[subprocess.Popen[bytes]]:
    processes = []
    for index, port in enumerate(health_ports):
        log = open(scratch / f"worker-{index}.log", "wb")  # noqa: SIM115 - lives with the process
        processes.append(subprocess.Popen([*command, "--health-port", str(port)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    print(f"  started {len(processes)} worker processes (pids "
          f"{', '.join(str(p.pid) for p in processes)})", flush=True)
    return processes


def _stop_workers(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


async def _drive(client: Any, blueprint: Any, order_count: int) -> tuple[list[str], int, float]:
    from ..examples.orders import sample_orders

    orders = sample_orders(order_count)
    started = time.perf_counter()
    run_ids = {}
    for order in orders:
        run_ids[await client.start_workflow(blueprint, {"order": order},
                                            run_id=order["id"])] = order
    print(f"  started {len(run_ids)} runs of '{blueprint.id}'; waiting for the workers ...",
          flush=True)
    pending = set(run_ids)
    finals: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for run_id in sorted(pending):
            status = await client.get_run_status(run_id)
            if status and status.get("status") in ("completed", "failed", "cancelled"):
                pending.discard(run_id)
                finals[run_id] = await client.wait_for_result(run_id, timeout=5)
                result = finals[run_id]
                print(f"  [{time.perf_counter() - started:5.2f}s] {run_id} {result.status}",
                      flush=True)
        await asyncio.sleep(0.5)  # polling costs the local server CPU the workers need
    elapsed = time.perf_counter() - started
    print("\nresults:")
    executed = 0
    statuses = []
    for run_id in run_ids:
        result = finals.get(run_id)
        if result is None:
            print(f"  {run_id}: did not finish within 120 s")
            statuses.append("timeout")
            continue
        nodes = sum(1 for key in result.context if key.startswith("_outputs."))
        executed += nodes
        _print_run(run_id, result.status, result.context, nodes,
                   [e.message for e in result.errors])
        statuses.append(result.status)
    return statuses, executed, elapsed


def _print_run(run_id: str, status: str, context: dict[str, Any], nodes: int,
               errors: list[str]) -> None:
    from ..context import public_view

    context = public_view(context)
    decision = context.get("_outputs.decide") or {}
    line = f"  {run_id}: {status:<9} {nodes:>2} nodes"
    if decision:
        line += f"  risk {decision.get('risk')}, amount {decision.get('amount')} EUR"
    notify = context.get("_outputs.notify")
    if notify:
        line += f"  -> {notify}"
    for error in errors:
        line += f"  error: {error}"
    print(line)


def _summary(statuses: list[str], executed: int, elapsed: float) -> int:
    completed = sum(1 for status in statuses if status == "completed")
    print(f"{completed}/{len(statuses)} runs completed, {executed} node executions in "
          f"{elapsed:.2f}s")
    return 0 if completed == len(statuses) else 1
