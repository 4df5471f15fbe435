"""``flowcraft demo``: the example order pipeline, run end to end.

``aws-local`` (the default) starts a moto server (SQS + DynamoDB) inside
this process, provisions the queue and tables exactly as ``flowcraft
provision aws`` does, starts worker processes (``flowcraft worker aws``),
starts one run per order, shows each run finishing, and prints the results
and the number of SQS and DynamoDB requests the workers made.
``azure-local`` does the same on Azurite, a local Cosmos DB server and Redis;
``memory`` runs every order in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .blueprint import load_blueprint
from .context import public_view
from .events import FlowcraftEvent, InMemoryEventBus
from .examples import EXAMPLES_DIR
from .examples.orders import registry, sample_orders

DEMO_BLUEPRINT = EXAMPLES_DIR / "order_pipeline.json"
REGISTRY_SPEC = "flowcraft.examples.orders:registry"


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
    from .runtime import FlowRuntime

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
    from .adapters.connect import AwsSettings, aws_adapter, aws_clients
    from .local import moto_server

    print("flowcraft demo: starting a local AWS (moto: SQS + DynamoDB) in this process ...",
          flush=True)
    with moto_server() as endpoint, tempfile.TemporaryDirectory(prefix="flowcraft-") as scratch:
        os.environ.update(endpoint.environment())
        settings = AwsSettings.resolve(endpoint_url=endpoint.url)

        async def provision() -> list[str]:
            from .adapters.aws import provision_aws

            async with aws_clients(settings) as (sqs, dynamodb):
                return list((await provision_aws(sqs, dynamodb))["created"])

        return _distributed_demo("aws", settings, aws_adapter, provision, dict(os.environ),
                                 order_count, worker_count, Path(scratch), ui)


def _azure_demo(order_count: int, worker_count: int, ui: bool = False) -> int:
    from .adapters.connect import AzureSettings, azure_adapter, provision_azure
    from .local import azure_services

    print("flowcraft demo: starting local Azure services (Azurite queues, a Cosmos DB server, "
          "Redis) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="flowcraft-") as scratch, azure_services(
        Path(scratch)
    ) as services:
        os.environ.update(services.endpoints.environment())
        settings = AzureSettings.resolve()

        async def provision() -> list[str]:
            return list((await provision_azure(settings))["created"])

        return _distributed_demo("azure", settings, azure_adapter, provision, dict(os.environ),
                                 order_count, worker_count, Path(scratch), ui)


def _distributed_demo(backend: str, settings: Any, adapter_factory: Any, provision: Any,
                      env: dict[str, str], order_count: int, worker_count: int,
                      scratch: Path, ui: bool = False) -> int:
    from .runtime import FlowRuntime

    print(f"  provisioned: {', '.join(asyncio.run(provision())) or 'already there'}",
          flush=True)
    command = [sys.executable, "-m", "flowcraft", "worker", backend, "--registry",
               REGISTRY_SPEC, "--blueprints", str(EXAMPLES_DIR), "--concurrency", "8",
               "--poll-seconds", "5"]  # a stopping worker waits for its open receive
    processes = _start_workers(command, env, worker_count, scratch)
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
    except BaseException:
        _stop_workers(processes)
        raise
    _stop_workers(processes[1:] if ui else processes)
    code = _summary(statuses, executed, elapsed)
    calls = _worker_calls(scratch, worker_count)
    total = sum(calls.values())
    if total and executed:
        detail = ", ".join(f"{name} {count}" for name, count in calls.most_common())
        print(f"service requests made by the {worker_count} workers: {total} for {executed} "
              f"node executions = {total / executed:.2f} per node (idle polling included)\n"
              f"  ({detail})")
    if ui:
        print("\nthe run view stays at http://127.0.0.1:8080/ ; Ctrl-C ends the demo", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            processes[0].wait()
        _stop_workers(processes[:1])
    return code


def _worker_calls(scratch: Path, worker_count: int) -> Counter[str]:
    from .cli import WORKER_CALLS_PREFIX

    calls: Counter[str] = Counter()
    for index in range(worker_count):
        for line in (scratch / f"worker-{index}.log").read_text(errors="replace").splitlines():
            if line.startswith(WORKER_CALLS_PREFIX):
                calls.update(json.loads(line[len(WORKER_CALLS_PREFIX):]))
    return calls


# -- shared --------------------------------------------------------------------------------------


def _start_workers(command: Sequence[str], env: dict[str, str], count: int,
                   scratch: Path) -> list[subprocess.Popen[bytes]]:
    processes = []
    for index in range(count):
        log = open(scratch / f"worker-{index}.log", "wb")  # noqa: SIM115 - lives with the process
        processes.append(subprocess.Popen(list(command), env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
    print(f"  started {count} worker processes (pids "
          f"{', '.join(str(p.pid) for p in processes)})", flush=True)
    return processes


def _stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


async def _drive(client: Any, blueprint: Any, order_count: int) -> tuple[list[str], int, float]:
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
