"""A map over many items on the local AWS and Azure stacks: time, requests and item sizes.

    .venv/bin/python bench/big_map.py                       # 100,000 items, both stacks
    .venv/bin/python bench/big_map.py --items 20000 --stacks aws --workers 1,3

One run of ``batch(step) -> count`` over ``--items`` integers (``step``: input + 1), through
``--workers`` ``python -m flowcraft worker`` processes with the claim check on (a payload
bucket or container that ``flowcraft provision`` creates). A worker runs a map this large
as a map ledger (``flowcraft.distributed.ledger``): chunks of items in items of their own.
For each case it prints:

* the time from start to the run seen completed, and items per second;
* the workers' service requests per item (each worker prints its counts when it stops);
* the largest item the run left in the contexts table or container (the run's item and
  its chunks), and how many chunks there were;
* the workers' peak RSS (``VmHWM`` of each process).

Checked: the gathered results are every item plus one, in item order. A benchmark, not a
test: it prints PASS/MISS for the targets (largest item under 16 KB, worker RSS under
300 MB) and exits 0 unless the services cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import (
    WorkerProcess,
    print_header,
    print_table,
    registry,
    start_workers,
    stop_workers,
    tail,
    verdict,
    worker_environment,
)

BLUEPRINT_ID = "bench-big-map"


def blueprint() -> dict[str, Any]:
    params = {"workerUsesKey": "step", "gatherNodeId": "map_gather", "outputKey": "results"}
    return {"id": BLUEPRINT_ID, "nodes": [
        {"id": "map_scatter", "uses": "batch-scatter", "inputs": "items", "params": params},
        {"id": "map_gather", "uses": "batch-gather",
         "params": {"outputKey": "results", "gatherNodeId": "map_gather"}},
        {"id": "count", "uses": "step"}],
        "edges": [{"source": "map_scatter", "target": "map_gather"},
                  {"source": "map_gather", "target": "count"}]}


@dataclass
class Case:
    stack: str
    workers: int
    items: int
    seconds: float | None = None
    calls: Counter[str] = field(default_factory=Counter)
    largest: int | None = None
    chunks: int = 0
    peak_rss_mb: float = 0.0
    problems: list[str] = field(default_factory=list)


class RssWatch:
    """Polls the workers' peak RSS (``VmHWM``) until stopped."""

    def __init__(self, workers: list[WorkerProcess]) -> None:
        self.workers = workers
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        for worker in self.workers:
            try:
                status = Path(f"/proc/{worker.process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> float:
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024


def item_bytes(item: dict[str, Any]) -> int:
    return len(json.dumps(item, default=str).encode())


async def stored_items(settings: Any, run_id: str) -> list[dict[str, Any]]:
    """The run's item and its chunks, as the database holds them."""
    from flowcraft.adapters import connect

    if isinstance(settings, connect.AzureSettings):
        async with connect.azure_clients(settings) as (_queue, _service, cosmos, _redis):
            container = cosmos.get_database_client(settings.database).get_container_client(
                settings.context_container)
            return [dict(item) async for item in container.query_items(
                "SELECT * FROM c WHERE STARTSWITH(c.id, @p)",
                parameters=[{"name": "@p", "value": run_id}])]
    async with connect.aws_clients(settings) as (_sqs, dynamodb):
        items: list[dict[str, Any]] = []
        arguments: dict[str, Any] = {
            "TableName": settings.context_table, "ConsistentRead": True,
            "FilterExpression": "begins_with(runId, :p)",
            "ExpressionAttributeValues": {":p": {"S": run_id}}}
        while True:
            page = await dynamodb.scan(**arguments)
            items += page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return items
            arguments["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def run_case(case: Case, settings: Any, blueprint_dir: Path, scratch: Path, env: dict[str, str],
             concurrency: int, timeout: float) -> None:
    from flowcraft import FlowRuntime, WorkflowBlueprint
    from flowcraft.adapters import connect

    bp = WorkflowBlueprint.model_validate(blueprint())
    options = FlowRuntime(blueprints={bp.id: bp}, registry=registry).options
    workers: list[WorkerProcess] = []
    watch: RssWatch | None = None
    try:
        workers = start_workers(case.stack, case.workers, blueprint_dir, scratch, env,
                                concurrency, tag=f"{case.stack}{case.workers}-")
        watch = RssWatch(workers)

        async def drive() -> None:
            async with connect.open_adapter(settings, options) as client:
                run_id = f"map-{uuid.uuid4().hex[:8]}"
                started = time.perf_counter()
                await client.start_workflow(bp, {"items": list(range(case.items))},
                                            run_id=run_id)
                result = await client.wait_for_result(run_id, timeout=timeout,
                                                      poll_interval=0.5)
                if result.status != "completed":
                    case.problems.append(f"run {result.status}: {result.errors}")
                    return
                case.seconds = time.perf_counter() - started
                if result.context.get("results") != [i + 1 for i in range(case.items)]:
                    case.problems.append("the gathered results are wrong")
                items = await stored_items(settings, run_id)
                case.largest = max(item_bytes(item) for item in items)
                case.chunks = sum(1 for item in items
                                  if "~map~" in str(item.get("runId") or item.get("id")))

        asyncio.run(drive())
    except Exception as exc:
        case.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        if watch is not None:
            case.peak_rss_mb = watch.stop()
        stop_workers(workers)
    for worker in workers:
        case.calls.update(worker.calls)
    if case.problems and workers:
        case.problems.append(tail(workers[0].log()))


def print_report(cases: list[Case]) -> None:
    rows = []
    for case in cases:
        requests = sum(case.calls.values())
        rows.append([
            case.stack, case.workers, f"{case.items:,}",
            f"{case.seconds:.1f}" if case.seconds else "-",
            f"{case.items / case.seconds:,.0f}" if case.seconds else "-",
            f"{requests / case.items:.3f}" if requests else "-",
            f"{case.largest:,}" if case.largest else "-", case.chunks,
            f"{case.peak_rss_mb:.0f}",
        ])
    print_table(["stack", "workers", "items", "seconds", "items/s", "requests/item",
                 "largest item (B)", "chunks", "worker peak RSS (MB)"], rows)
    for case in cases:
        for problem in case.problems:
            print(f"  {case.stack} x{case.workers}: {problem}")
        top = ", ".join(f"{name} {count}" for name, count in case.calls.most_common(8))
        if top:
            print(f"  {case.stack} x{case.workers} requests: {top}")
    print()
    done = [c for c in cases if c.seconds]
    largest = max((c.largest or 0 for c in done), default=0)
    verdict("largest item of the run under 16 KB", "PASS" if done and largest < 16384
            else "MISS", f"{largest:,} B")
    rss = max((c.peak_rss_mb for c in cases), default=0.0)
    verdict("worker RSS under 300 MB", "PASS" if done and rss < 300 else "MISS",
            f"{rss:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--stacks", default="aws,azure")
    parser.add_argument("--workers", default="2", help="worker process counts (default 2)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    print_header(f"A map over {args.items:,} items (map ledger, claim check on)")
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="flowcraft-bench-") as scratch_text:
        scratch = Path(scratch_text)
        blueprint_dir = scratch / "blueprints"
        blueprint_dir.mkdir()
        (blueprint_dir / f"{BLUEPRINT_ID}.json").write_text(json.dumps(blueprint()))
        for stack in stacks:
            for count in counts:
                case = Case(stack, count, args.items)
                cases.append(case)
                try:
                    run_stack(case, blueprint_dir, scratch, args.concurrency, args.timeout)
                except Exception as exc:
                    print(f"cannot start the {stack} stack: {exc}")
                    return 1
    print_report(cases)
    return 0


def run_stack(case: Case, blueprint_dir: Path, scratch: Path, concurrency: int,
              timeout: float) -> None:
    """Start the stack's local services, provision, run the case."""
    from flowcraft.adapters import connect

    suffix = uuid.uuid4().hex[:8]
    if case.stack == "aws":
        from flowcraft.local import moto_server

        with moto_server() as endpoint:
            settings = connect.AwsSettings(
                region="us-east-1", endpoint_url=endpoint.url, queue_name=f"map-{suffix}",
                context_table=f"ctx-{suffix}", status_table=f"st-{suffix}",
                coordination_table=f"co-{suffix}", payload_bucket=f"pay-{suffix}")
            os.environ.update(endpoint.environment())
            created = asyncio.run(connect.provision(settings))
            settings.queue_url = created.get("queueUrl") or settings.queue_url
            env = worker_environment({
                "AWS_ENDPOINT_URL": endpoint.url, "SQS_QUEUE_URL": str(settings.queue_url),
                "FLOWCRAFT_QUEUE_NAME": settings.queue_name,
                "FLOWCRAFT_CONTEXT_TABLE": settings.context_table,
                "FLOWCRAFT_STATUS_TABLE": settings.status_table,
                "FLOWCRAFT_COORDINATION_TABLE": settings.coordination_table,
                "FLOWCRAFT_PAYLOAD_BUCKET": str(settings.payload_bucket)})
            run_case(case, settings, blueprint_dir, scratch, env, concurrency, timeout)
        return
    from flowcraft.local import azure_services

    with azure_services(scratch) as services:
        os.environ.update(services.endpoints.environment())
        settings = connect.AzureSettings.resolve(
            queue_name=f"map-{suffix}", payload_container=f"pay-{suffix}", verify_tls=False)
        asyncio.run(connect.provision(settings))
        env = worker_environment({**services.endpoints.environment(),
                                  "FLOWCRAFT_QUEUE_NAME": settings.queue_name,
                                  "FLOWCRAFT_PAYLOAD_CONTAINER": str(
                                      settings.payload_container)})
        run_case(case, settings, blueprint_dir, scratch, env, concurrency, timeout)


if __name__ == "__main__":
    sys.exit(main())
