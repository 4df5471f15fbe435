"""Azure service calls per node and worker throughput, on the local Azure stack.

    .venv/bin/python bench/azure_calls.py                    # everything (about 2-5 min)
    .venv/bin/python bench/azure_calls.py --throughput-runs 20   # a longer throughput mix
    .venv/bin/python bench/azure_calls.py --skip-throughput --runs 1 --idle-seconds 10
    .venv/bin/python bench/azure_calls.py --shapes chain:50,fan:100 --workers 1,2,4

The stack is ``flowcraft.local.azure_services()``: Azurite (queues), a Cosmos DB
SQL API server (``@vercel/cosmosdb-server``) and ``redis-server``, each a child process
on a free port.

Part 1, requests per executed node. One worker adapter runs in this process
(``azure_adapter(..., calls=Counter())``: every HTTP request to the queue service and to
Cosmos DB is counted as ``queue.<METHOD>`` / ``cosmos.<METHOD>``, retries included, and
every Redis round trip as ``redis.<operation>`` by ``RedisCoordinationStore.calls``).
Runs are started by a second adapter with its own counter (the "client"), so the
worker's counts hold only the worker's requests. The worker's counter is read when the
runs are started and again when the last one is seen finished.

Queue Storage has no long polling: a worker polls an empty queue (backing off to
``max_poll_interval``, 1 s). Those polls are counted in the run window too; the worker's
logical operations (receive calls that came back empty, claims, commits, sends, ...) are
counted as well, by wrapping the adapter instance's primitives, so the table can show
the per-node cost with and without empty polls. The idle rate is measured on its own,
before the runs: a fresh worker on an empty queue for ``--idle-seconds``.

Part 2, throughput: ``--throughput-runs`` runs of a 20-branch fan-out/fan-in plus a
25-node chain per five, at most ``--in-flight`` unfinished at a time, through 1 (and
4, ...) ``python -m flowcraft worker azure`` processes. Nodes/s = executed nodes /
seconds from the first start to the last run seen finished. The emulators are Node.js
processes sharing the machine's CPUs with the workers.

This is a benchmark, not a test: it prints PASS/MISS per target and always exits 0
(unless the local services cannot start).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import (
    REFERENCE_CALLS_PER_NODE,
    Budget,
    Shape,
    breakdown,
    load_average,
    load_results,
    parse_ints,
    parse_shapes,
    per_node,
    print_header,
    print_table,
    run_closed_loop,
    runtime_options,
    start_runs,
    start_workers,
    stop_workers,
    subtract,
    throughput_mix,
    verdict,
    vs_reference,
    wait_runs,
    worker_environment,
    write_blueprints,
)

TARGET_CALLS_PER_NODE = 4.0
SKIPPED = "skipped: not enough of --budget left"
HTTP_MEANING = {
    "queue.GET": "receive", "queue.POST": "send", "queue.DELETE": "delete",
    "queue.PUT": "update visibility", "cosmos.PATCH": "patch (claim/commit/status)",
    "cosmos.GET": "read", "cosmos.POST": "create/query", "cosmos.PUT": "replace",
}


def remote(calls: Counter[str]) -> Counter[str]:
    """Queue + Cosmos requests (HTTP)."""
    return Counter({k: v for k, v in calls.items() if k.startswith(("queue.", "cosmos."))})


def redis_calls(calls: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in calls.items() if k.startswith("redis.")})


# -- logical operations of the worker (for the breakdown) ---------------------------------------


class _CountedContext:
    """A DistributedContext whose coroutine methods are counted as ``context.<name>``."""

    def __init__(self, inner: Any, ops: Counter[str]) -> None:
        self._inner = inner
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(value):
            return value

        @functools.wraps(value)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._ops[f"context.{name}"] += 1
            return await value(*args, **kwargs)

        return counted


def count_operations(adapter: Any, ops: Counter[str]) -> None:
    """Count the adapter's backend calls by shadowing them on its queue and stores."""

    def wrap(part: Any, name: str, count: Callable[[tuple[Any, ...], Any], None]) -> None:
        original = getattr(part, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            count(args, result)
            return result

        setattr(part, name, counted)

    def on_receive(_args: tuple[Any, ...], result: Any) -> None:
        ops["queue.receive"] += 1
        if not result:
            ops["queue.receive (empty)"] += 1
        ops["queue.messages received"] += len(result)

    queue, statuses, runs = adapter.backend.queue, adapter.backend.statuses, adapter.backend.runs
    wrap(queue, "receive_once", on_receive)
    wrap(queue, "send", lambda a, _r: ops.update({"queue.send (jobs)": len(a[0])}))
    wrap(queue, "delete", lambda a, _r: ops.update({"queue.delete (messages)": len(a[0])}))
    wrap(queue, "set_visibility", lambda _a, _r: ops.update({"queue.set_visibility": 1}))
    wrap(statuses, "write", lambda _a, _r: ops.update({"status.write": 1}))
    wrap(statuses, "read", lambda _a, _r: ops.update({"status.read": 1}))
    context = runs.context
    runs.context = lambda run_id: _CountedContext(context(run_id), ops)


# -- the cases ---------------------------------------------------------------------------------


def settings_for(queue_name: str) -> Any:
    from flowcraft.adapters.connect import AzureSettings

    return AzureSettings.resolve(queue_name=queue_name)  # the rest from the environment


async def provision(queue_name: str) -> None:
    from flowcraft.adapters.connect import provision_azure

    await provision_azure(settings_for(queue_name))


@dataclass
class CountResult:
    shape: Shape
    runs: int
    nodes: int = 0
    worker: Counter[str] = field(default_factory=Counter)  # HTTP + redis, in the run window
    ops: Counter[str] = field(default_factory=Counter)  # logical operations, run window
    client: Counter[str] = field(default_factory=Counter)
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)

    def remote_per_node(self) -> float | None:
        return sum(remote(self.worker).values()) / self.nodes if self.nodes else None

    def empty_polls(self) -> int:
        return self.ops.get("queue.receive (empty)", 0)

    def remote_per_node_busy(self) -> float | None:
        """Per node without the receive requests that found the queue empty (one receive
        call is one HTTP GET)."""
        if not self.nodes:
            return None
        return (sum(remote(self.worker).values()) - self.empty_polls()) / self.nodes


@dataclass
class IdleResult:
    seconds: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def rate(self) -> float | None:
        return sum(self.calls.values()) / self.seconds if self.seconds else None


async def measure_idle(options: Any, idle_seconds: float, concurrency: int) -> IdleResult:
    from flowcraft.adapters.connect import azure_adapter

    result = IdleResult()
    queue_name = f"bench-idle-{uuid.uuid4().hex[:8]}"
    await provision(queue_name)
    calls: Counter[str] = Counter()
    async with azure_adapter(settings_for(queue_name), options, calls=calls,
                             concurrency=concurrency) as worker:
        await worker.start()
        before = Counter(calls)  # client start-up (e.g. Cosmos account metadata) left out
        started = time.perf_counter()
        await asyncio.sleep(idle_seconds)
        result.calls = subtract(calls, before)
        result.seconds = time.perf_counter() - started
        await worker.stop(5)
    return result


async def count_case(shape: Shape, runs: int, concurrency: int, timeout: float) -> CountResult:
    from flowcraft.adapters.connect import azure_adapter

    result = CountResult(shape, runs)
    queue_name = f"bench-jobs-{uuid.uuid4().hex[:8]}"
    await provision(queue_name)
    options = runtime_options([shape])
    settings = settings_for(queue_name)
    worker_calls: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    async with azure_adapter(settings, options, calls=worker_calls,
                             concurrency=concurrency) as worker, azure_adapter(
        settings_for(queue_name), options, calls=result.client
    ) as client:
        count_operations(worker, ops)
        await worker.start()
        await asyncio.sleep(0.2)
        before, ops_before = Counter(worker_calls), Counter(ops)
        try:
            batch = await start_runs(client, [shape] * runs, f"count-{uuid.uuid4().hex[:6]}")
            await wait_runs(client, batch, timeout, poll=0.2, load=False)
            # Deletes and the completion write happen right around the moment the client
            # sees the run finished: give the worker a moment to settle.
            await asyncio.sleep(0.3)
            result.worker = subtract(worker_calls, before)
            result.ops = subtract(ops, ops_before)
            result.seconds = batch.seconds
            await load_results(client, batch)
            result.nodes = batch.executed
            result.problems += batch.problems
        except Exception as exc:
            result.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            await worker.stop(10)
    return result


@dataclass
class ThroughputResult:
    workers: int
    nodes: int = 0
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)

    def rate(self) -> float | None:
        return self.nodes / self.seconds if self.seconds and not self.problems else None


def throughput_case(worker_count: int, mix: list[Shape], blueprint_dir: Path, scratch: Path,
                    concurrency: int, in_flight: int, timeout: float) -> ThroughputResult:
    from flowcraft.adapters.connect import azure_adapter

    result = ThroughputResult(worker_count)
    queue_name = f"bench-tp-{uuid.uuid4().hex[:8]}"
    asyncio.run(provision(queue_name))
    env = worker_environment({"FLOWCRAFT_QUEUE_NAME": queue_name})
    workers = []
    try:
        workers = start_workers("azure", worker_count, blueprint_dir, scratch, env, concurrency,
                                tag=f"tp{worker_count}-")
        options = runtime_options(list({s.id: s for s in mix}.values()))

        async def drive() -> None:
            async with azure_adapter(settings_for(queue_name), options) as client:
                batch = await run_closed_loop(client, mix,
                                              f"tp{worker_count}-{uuid.uuid4().hex[:6]}",
                                              in_flight, timeout)
                await load_results(client, batch)  # after the clock stopped: a check
                result.nodes = batch.executed
                result.seconds = batch.seconds
                result.problems += batch.problems

        asyncio.run(drive())
    except Exception as exc:
        result.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_workers(workers)
    for worker in workers:
        result.calls.update(worker.calls)
    return result


# -- report ------------------------------------------------------------------------------------


def print_idle(idle: IdleResult) -> None:
    print(f"\nIdle polling (one worker, empty queue, {idle.seconds:.1f} s)")
    rate = idle.rate()
    if rate is None:
        print("  not measured: " + "; ".join(idle.problems))
        return
    print(f"  {sum(idle.calls.values())} requests = {rate:.2f} requests/s "
          f"({rate * 3600:,.0f} per hour) per idle worker: {breakdown(idle.calls, 0)}")


def print_counts(results: list[CountResult]) -> None:
    print("\nRequests per executed node (client-side counters; one worker adapter in this "
          "process)")
    rows = []
    for r in results:
        if not r.nodes:
            rows.append([r.shape.name, r.runs, "-", "-", "-", "-", "-", "-", "-", "-", "FAIL"])
            continue
        worker_remote = sum(remote(r.worker).values())
        client_remote = sum(remote(r.client).values())
        rows.append([
            r.shape.name, r.runs, r.nodes, f"{r.seconds:.1f}" if r.seconds else "-",
            worker_remote, per_node(worker_remote, r.nodes), r.empty_polls(),
            f"{r.remote_per_node_busy():.2f}", sum(redis_calls(r.worker).values()),
            per_node(worker_remote + client_remote, r.nodes),
            vs_reference(r.remote_per_node()),
        ])
    print_table(["shape", "runs", "nodes", "seconds", "worker q+cosmos", "per node",
                 "empty polls", "per node excl. empty", "redis", "total/node",
                 "worker vs ref (12, est.)"], rows)
    print("  worker q+cosmos: the worker's queue and Cosmos DB HTTP requests between starting "
          "the runs and\n  seeing the last one finish, including receive calls that found "
          "the queue empty (\"empty polls\":\n  Queue Storage has no long polling). total/node "
          "adds this script's client requests (start,\n  status polling). redis: Redis round "
          "trips of the worker. The reference's ~12 calls per node is\n  an estimate of its "
          "design (status touch, several context reads, separate output and delta\n  writes, "
          "a send per successor, a delete per message), not measured.")
    for r in results:
        if not r.nodes:
            continue
        print(f"\n  {r.shape.name}: by request (worker)")
        print("    " + ", ".join(f"{k} [{HTTP_MEANING.get(k, '?')}] {v} ({v / r.nodes:.2f}/node)"
                                 for k, v in remote(r.worker).most_common()))
        print(f"    redis: {breakdown(redis_calls(r.worker), r.nodes)}")
        print(f"    logical operations: {breakdown(r.ops, r.nodes, limit=20)}")
        print(f"    client: {breakdown(r.client, r.nodes)}")
    for r in results:
        if r.problems:
            print(f"\n  {r.shape.name} problems: " + "; ".join(r.problems[:5]))


def print_throughput(results: list[ThroughputResult], mix: list[Shape], in_flight: int) -> None:
    shapes = Counter(s.name for s in mix)
    flight = f"at most {in_flight} unfinished at a time" if in_flight > 0 else "started at once"
    print("\nThroughput (worker processes; " + ", ".join(f"{n} x {name}" for name, n in
                                                      shapes.items())
          + f" = {sum(s.nodes for s in mix)} nodes, {flight})")
    base = next((r.rate() for r in results if r.workers == 1 and r.rate()), None)
    rows = []
    for r in results:
        rate = r.rate()
        rows.append([r.workers, r.nodes, f"{r.seconds:.2f}" if r.seconds else "-",
                     f"{rate:,.1f}" if rate else "FAIL",
                     f"{rate / base:.2f}x" if rate and base else "-",
                     per_node(sum(remote(r.calls).values()), r.nodes) if r.nodes else "-",
                     sum(redis_calls(r.calls).values())])
    print_table(["workers", "nodes", "seconds", "nodes/s", "vs 1 worker",
                 "worker q+cosmos/node", "redis"], rows)
    print(f"  worker q+cosmos/node is over each worker process's lifetime (start-up and idle "
          f"polls included).\n  Azurite, the Cosmos DB server and Redis share {os.cpu_count()} "
          "CPUs with the workers and this script; the\n  local servers are CPU-bound, so more "
          "workers cannot scale linearly here.")
    for r in results:
        if r.problems:
            print(f"  {r.workers} worker(s) problems: " + "; ".join(r.problems[:5]))


def print_targets(counts: list[CountResult], idle: IdleResult | None,
                  throughput: list[ThroughputResult]) -> None:
    print("\nTargets")
    for r in counts:
        label = (f"{r.shape.name}: worker queue + Cosmos requests per node <= "
                 f"{TARGET_CALLS_PER_NODE:g}")
        total, busy = r.remote_per_node(), r.remote_per_node_busy()
        if total is None or busy is None:
            verdict(label, "N/A" if SKIPPED in r.problems else "MISS",
                    "did not complete: " + "; ".join(r.problems[:2]))
            continue
        verdict(label + " (all requests)", "PASS" if total <= TARGET_CALLS_PER_NODE else "MISS",
                f"{total:.2f} (reference estimate {REFERENCE_CALLS_PER_NODE:g})")
        verdict(label + " (excl. empty polls)",
                "PASS" if busy <= TARGET_CALLS_PER_NODE else "MISS", f"{busy:.2f}")
    for r in counts:
        if not r.nodes:
            continue
        redis = sum(redis_calls(r.worker).values())
        if r.shape.joins == 0:
            verdict(f"{r.shape.name}: no Redis calls without joins",
                    "PASS" if redis == 0 else "MISS", f"{redis} Redis round trips")
        else:
            detail = (breakdown(redis_calls(r.worker), 0) if redis else
                      "none: all joins are decided from the committed context")
            verdict(f"{r.shape.name}: Redis calls only at joins", "INFO",
                    f"{redis} Redis round trips for {r.runs * r.shape.joins} join(s) ({detail})")
    if idle is not None and idle.rate() is not None:
        verdict("idle polling", "INFO", f"{idle.rate():.2f} requests/s per idle worker")
    rates = {r.workers: r.rate() for r in throughput}
    if 1 in rates and len(rates) > 1:
        top = max(rates)
        if rates[1] and rates[top]:
            verdict(f"throughput {top}/1 workers", "INFO",
                    f"{rates[top]:,.1f} / {rates[1]:,.1f} nodes/s = "
                    f"{rates[top] / rates[1]:.2f}x (no target; CPU-bound local servers)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="chain,fan",
                        help="request-count shapes: chain (50 nodes), fan (100 branches), or "
                             "with sizes, e.g. chain:50,fan:100 (default %(default)s)")
    parser.add_argument("--runs", type=int, default=2,
                        help="runs per shape for the request count (default %(default)s)")
    parser.add_argument("--workers", default="1,4",
                        help="worker process counts for the throughput part (default %(default)s)")
    parser.add_argument("--throughput-runs", type=int, default=10,
                        help="20-branch fan-out/fan-in runs in the throughput mix, plus one "
                             "25-node chain per 5 of them (default %(default)s)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="throughput: runs unfinished at any time (a new one starts when "
                             "the oldest finishes); 0 starts all at once (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="jobs at once per worker (default %(default)s)")
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="how long to watch an idle worker; its receive loop restarts its "
                             "backoff every 20 s (default %(default)s)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-counts", action="store_true")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds any one case may wait for its runs (default %(default)s)")
    parser.add_argument("--budget", type=float, default=255.0,
                        help="seconds for the whole benchmark: each case's time limit is cut "
                             "to what is left, and cases that no longer fit are skipped "
                             "(default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="keep the service and worker logs here (default: a temporary "
                             "directory, removed at the end)")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        worker_counts = parse_ints(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    mix = throughput_mix(args.throughput_runs)
    budget = Budget(args.budget, args.timeout)

    print_header("Azure service calls per node and throughput (Azurite, a local Cosmos DB "
                 "server, Redis)")
    from flowcraft.local import azure_services

    counts: list[CountResult] = []
    idle: IdleResult | None = None
    throughput: list[ThroughputResult] = []
    with tempfile.TemporaryDirectory(prefix="flowcraft-bench-") as scratch_text:
        scratch = Path(args.log_dir or scratch_text)
        scratch.mkdir(parents=True, exist_ok=True)
        blueprint_dir = scratch / "blueprints"
        write_blueprints(blueprint_dir, [*shapes, *{s.id: s for s in mix}.values()])
        try:
            services_context = azure_services(scratch)
            services = services_context.__enter__()
        except Exception as exc:
            print(f"cannot start the local Azure services: {exc}")
            return 1
        try:
            os.environ.update(services.endpoints.environment())
            print(f"Azurite :{services.azurite.port}, Cosmos DB server :{services.cosmos.port}, "
                  f"Redis :{services.redis.port}; worker concurrency {args.concurrency}; time "
                  f"limit {args.timeout:g} s per case\n", flush=True)
            if not args.skip_counts:
                options = runtime_options(shapes)
                if args.idle_seconds > 0:
                    print(f"  idle worker for {args.idle_seconds:g} s ...", end=" ", flush=True)
                    try:
                        idle = asyncio.run(measure_idle(options, args.idle_seconds,
                                                        args.concurrency))
                        print(f"{sum(idle.calls.values())} requests", flush=True)
                    except Exception as exc:
                        idle = IdleResult(problems=[f"{type(exc).__name__}: {exc}"])
                        print(f"FAIL: {exc}", flush=True)
                for shape in shapes:
                    print(f"  counting {shape.name} x {args.runs} ...", end=" ", flush=True)
                    started = time.perf_counter()
                    limit = budget.timeout()
                    try:
                        r = (CountResult(shape, args.runs, problems=[SKIPPED]) if limit is None
                             else asyncio.run(count_case(shape, args.runs, args.concurrency,
                                                         limit)))
                    except Exception as exc:
                        r = CountResult(shape, args.runs,
                                        problems=[f"{type(exc).__name__}: {exc}"])
                    counts.append(r)
                    state = (f"{sum(remote(r.worker).values())} worker requests for {r.nodes} "
                             "nodes" if r.nodes else "FAIL: " + "; ".join(r.problems[:2]))
                    print(f"{state} ({time.perf_counter() - started:.1f} s)", flush=True)
            if not args.skip_throughput:
                for count in worker_counts:
                    print(f"  throughput, {count} worker process(es) ...", end=" ", flush=True)
                    limit = budget.timeout(reserve=30.0)
                    if limit is None:
                        r = ThroughputResult(count, problems=[SKIPPED])
                    else:
                        r = throughput_case(count, mix, blueprint_dir, scratch,
                                            args.concurrency, args.in_flight, limit)
                    throughput.append(r)
                    print(f"{r.nodes} nodes in {r.seconds:.2f} s" if r.rate() else
                          ("" if SKIPPED in r.problems else "FAIL: ")
                          + "; ".join(r.problems[:2]), flush=True)
        finally:
            services_context.__exit__(None, None, None)

    if idle is not None:
        print_idle(idle)
    if counts:
        print_counts(counts)
    if throughput:
        print_throughput(throughput, mix, args.in_flight)
    print(f"\nat the end: {load_average()}")
    print_targets(counts, idle, throughput)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "idle": None if idle is None else {"seconds": idle.seconds, "calls": idle.calls},
            "counts": [{"shape": r.shape.name, "runs": r.runs, "nodes": r.nodes,
                        "worker": r.worker, "operations": r.ops, "client": r.client,
                        "seconds": r.seconds, "problems": r.problems} for r in counts],
            "throughput": [{"workers": r.workers, "nodes": r.nodes, "seconds": r.seconds,
                            "nodesPerSecond": r.rate(), "workerCalls": r.calls,
                            "problems": r.problems} for r in throughput],
        }, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
