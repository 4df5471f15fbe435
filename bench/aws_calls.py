"""AWS service calls per node and worker throughput, against a local moto server.

    .venv/bin/python bench/aws_calls.py                      # everything (about 2-4 min)
    .venv/bin/python bench/aws_calls.py --skip-throughput --runs 1
    .venv/bin/python bench/aws_calls.py --shapes chain:50,fan:100 --workers 1,2,4

Part 1, requests per executed node. One ``python -m flowcraft worker aws`` process
runs ``--runs`` runs of each shape (a 50-node chain; a 100-branch fan-out/fan-in whose
sink is an ``all`` join). moto's request recorder logs every HTTP request the server
receives, from before the worker starts until after it has stopped; the worker's
requests and this script's own client requests (start_workflow, status polling,
loading the result) are told apart by the ``app/...`` part of the User-Agent
(``AWS_SDK_UA_APP_ID``), and each request's operation comes from its ``X-Amz-Target``
header. The same numbers are also counted client-side (the worker's ``calls=``
counter, which it prints when stopped with SIGTERM, and this script's own counter) as a
cross-check. Every case gets its own queue and tables.

Part 2, throughput. ``--throughput-runs`` runs of a 20-branch fan-out/fan-in plus a
few 25-node chains are started at once, then 1 (and 4, ...) worker processes work
through them. Nodes/s = executed nodes / seconds from the first start to the last run
seen completed. The moto server runs in this process (``flowcraft.local``)
and is single-threaded CPU work: on a small machine it, not the workers, is the
bottleneck.

This is a benchmark, not a test: it prints PASS/MISS per target and always exits 0
(unless the local services cannot start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
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
    tail,
    throughput_mix,
    verdict,
    vs_reference,
    wait_runs,
    worker_environment,
    write_blueprints,
)

TARGET_CALLS_PER_NODE = 4.0
SKIPPED = "skipped: not enough of --budget left"
WORKER_APP = "flowcraft-bench-worker"
CLIENT_APP = "flowcraft-bench-client"


# -- moto -------------------------------------------------------------------------------------


def serialize_moto_recorder() -> None:
    """Let moto's request recorder write one request at a time: it writes each request as
    two writes to its file, so requests from parallel server threads can interleave into a
    line that is not JSON."""
    import threading

    from moto.moto_api._internal.recorder.models import Recorder as MotoRecorder

    original = MotoRecorder._record_request
    lock = threading.Lock()

    def record(self: Any, request: Any, body: bytes | None = None) -> None:
        with lock:
            original(self, request, body)

    MotoRecorder._record_request = record  # type: ignore[method-assign]


def serialize_moto_dynamodb() -> None:
    """Run moto's DynamoDB requests one at a time.

    moto's threaded server handles requests on parallel threads, and its DynamoDB model is
    not thread-safe: two concurrent ``UpdateItem`` calls on one item can fail with
    ``RuntimeError: dictionary changed size during iteration`` *after* the update was
    applied. The SDK then retries a write that already landed, which inflates the counts
    and, for a commit, makes the worker believe it lost its lease. Real DynamoDB is
    linearisable per item, so a lock here makes moto behave more like it, not less.
    """
    import threading

    from moto.dynamodb.responses import DynamoHandler

    original = DynamoHandler.call_action
    if getattr(original, "_bench_serialized", False):
        return
    lock = threading.Lock()

    def call_action(self: Any) -> Any:
        with lock:
            return original(self)

    call_action._bench_serialized = True  # type: ignore[attr-defined]
    DynamoHandler.call_action = call_action  # type: ignore[method-assign]


# -- moto's request recorder -------------------------------------------------------------------


class Recorder:
    """moto's HTTP request recorder (``/moto-api/recorder/...``) on a running server."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")

    def _call(self, action: str, method: str = "POST") -> bytes:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}",
                                         method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def start(self) -> None:
        self._call("reset-recording")
        self._call("start-recording")

    def stop(self) -> list[dict[str, Any]]:
        self._call("stop-recording")
        text = self._call("download-recording", "GET").decode("utf-8", "replace")
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def attempt(entry: dict[str, Any]) -> int:
    """The SDK's attempt number of a recorded request (``amz-sdk-request: attempt=2; ...``)."""
    headers = {k.lower(): v for k, v in (entry.get("headers") or {}).items()}
    for part in str(headers.get("amz-sdk-request", "")).split(";"):
        name, _, value = part.strip().partition("=")
        if name == "attempt" and value.isdigit():
            return int(value)
    return 1


def classify(entry: dict[str, Any]) -> tuple[str, str]:
    """(who, ``service.Operation``) of one recorded request."""
    headers = {k.lower(): v for k, v in (entry.get("headers") or {}).items()}
    agent = headers.get("user-agent", "")
    who = "worker" if f"app/{WORKER_APP}" in agent else (
        "client" if f"app/{CLIENT_APP}" in agent else "other")
    target = headers.get("x-amz-target", "")
    if target:
        prefix, _, operation = target.partition(".")
        service = "dynamodb" if prefix.startswith("DynamoDB") else (
            "sqs" if prefix.startswith("AmazonSQS") else prefix.lower())
        return who, f"{service}.{operation}"
    # Query protocol (older SDKs): Action=... in the form body.
    body = entry.get("body") or ""
    if entry.get("body_encoded"):
        import base64

        body = base64.b64decode(body).decode("utf-8", "replace")
    for part in str(body).split("&"):
        if part.startswith("Action="):
            return who, f"sqs.{part[len('Action='):]}"
    return who, f"{entry.get('method', '?')} {entry.get('url', '?')}"


# -- the cases ---------------------------------------------------------------------------------


@dataclass
class Names:
    queue_name: str
    context_table: str
    status_table: str
    coordination_table: str
    queue_url: str = ""

    @classmethod
    def fresh(cls) -> Names:
        suffix = uuid.uuid4().hex[:8]
        return cls(f"bench-jobs-{suffix}", f"bench-contexts-{suffix}",
                   f"bench-statuses-{suffix}", f"bench-coordination-{suffix}")

    def environment(self) -> dict[str, str]:
        return {"SQS_QUEUE_URL": self.queue_url, "FLOWCRAFT_QUEUE_NAME": self.queue_name,
                "FLOWCRAFT_CONTEXT_TABLE": self.context_table,
                "FLOWCRAFT_STATUS_TABLE": self.status_table,
                "FLOWCRAFT_COORDINATION_TABLE": self.coordination_table}

    def settings(self, endpoint: str) -> Any:
        from flowcraft.adapters.connect import AwsSettings

        return AwsSettings.resolve(endpoint_url=endpoint, queue_url=self.queue_url,
                                   queue_name=self.queue_name, context_table=self.context_table,
                                   status_table=self.status_table,
                                   coordination_table=self.coordination_table)


async def provision(endpoint: str) -> Names:
    from flowcraft.adapters.aws import AwsNames, provision_aws
    from flowcraft.adapters.connect import AwsSettings, aws_clients

    names = Names.fresh()
    async with aws_clients(AwsSettings.resolve(endpoint_url=endpoint)) as (sqs, dynamodb):
        result = await provision_aws(sqs, dynamodb, AwsNames(
            names.queue_name, names.context_table, names.status_table,
            names.coordination_table))
    names.queue_url = result["queueUrl"]
    return names


@dataclass
class CountResult:
    shape: Shape
    runs: int
    nodes: int = 0
    worker: Counter[str] = field(default_factory=Counter)  # recorder, worker requests
    client: Counter[str] = field(default_factory=Counter)  # recorder, this script's requests
    other: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)  # recorder: attempt > 1, by who
    worker_counter: Counter[str] = field(default_factory=Counter)  # the worker's calls=
    client_counter: Counter[str] = field(default_factory=Counter)  # our calls=
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.nodes > 0

    def worker_per_node(self) -> float | None:
        return sum(self.worker.values()) / self.nodes if self.nodes else None


def count_case(endpoint: str, shape: Shape, runs: int, blueprint_dir: Path, scratch: Path,
               concurrency: int, timeout: float) -> CountResult:
    from flowcraft.adapters.connect import aws_adapter

    result = CountResult(shape, runs)
    names = asyncio.run(provision(endpoint))
    recorder = Recorder(endpoint)
    recorder.start()
    env = worker_environment({**names.environment(), "AWS_SDK_UA_APP_ID": WORKER_APP})
    workers = []
    try:
        workers = start_workers("aws", 1, blueprint_dir, scratch, env, concurrency,
                                tag=shape.name)
        options = runtime_options([shape])

        async def drive() -> None:
            async with aws_adapter(names.settings(endpoint), options,
                                   calls=result.client_counter) as client:
                batch = await start_runs(client, [shape] * runs, f"count-{uuid.uuid4().hex[:6]}")
                await wait_runs(client, batch, timeout)
                result.nodes = batch.executed
                result.seconds = batch.seconds
                result.problems += batch.problems

        asyncio.run(drive())
    except Exception as exc:  # report it; the benchmark goes on
        result.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        stop_workers(workers)
        entries = recorder.stop()
    for worker in workers:
        result.worker_counter.update(worker.calls)
        if not worker.calls:
            result.problems.append(f"worker printed no call counter: {tail(worker.log())}")
    for entry in entries:
        who, operation = classify(entry)
        {"worker": result.worker, "client": result.client, "other": result.other}[who][
            operation] += 1
        if attempt(entry) > 1:
            result.retries[f"{who} {operation}"] += 1
    return result


@dataclass
class ThroughputResult:
    workers: int
    nodes: int = 0
    runs: int = 0
    seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)

    def rate(self) -> float | None:
        return self.nodes / self.seconds if self.seconds and not self.problems else None


def throughput_case(endpoint: str, worker_count: int, mix: list[Shape], blueprint_dir: Path,
                    scratch: Path, concurrency: int, in_flight: int,
                    timeout: float) -> ThroughputResult:
    from flowcraft.adapters.connect import aws_adapter

    result = ThroughputResult(worker_count, runs=len(mix))
    names = asyncio.run(provision(endpoint))
    env = worker_environment({**names.environment(), "AWS_SDK_UA_APP_ID": WORKER_APP})
    workers = []
    try:
        workers = start_workers("aws", worker_count, blueprint_dir, scratch, env, concurrency,
                                tag=f"tp{worker_count}-")
        options = runtime_options(list({s.id: s for s in mix}.values()))

        async def drive() -> None:
            async with aws_adapter(names.settings(endpoint), options) as client:
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


def print_counts(results: list[CountResult]) -> None:
    print("\nRequests per executed node (moto request recorder; one worker process)")
    rows = []
    for r in results:
        if not r.nodes:
            rows.append([r.shape.name, r.runs, "-", "-", "-", "-", "-", "-", "FAIL"])
            continue
        worker = sum(r.worker.values())
        client = sum(r.client.values())
        rows.append([
            r.shape.name, r.runs, r.nodes, worker, per_node(worker, r.nodes), client,
            per_node(worker + client, r.nodes), f"{REFERENCE_CALLS_PER_NODE:.0f} (est.)",
            vs_reference(worker / r.nodes),
        ])
    print_table(["shape", "runs", "nodes", "worker reqs", "worker/node", "client reqs",
                 "total/node", "reference/node", "worker vs ref"], rows)
    print("  worker/node: every request of the worker process over its lifetime (idle long "
          "polls included);\n  total/node adds this script's start_workflow, status polling "
          "and result loading.\n  reference/node is an estimate of the reference design "
          "(status touch, several context\n  reads, separate output and delta writes, a send "
          "per successor, a delete per message), not measured.")
    for r in results:
        if not r.nodes:
            continue
        print(f"\n  {r.shape.name}: by operation (recorder)")
        print(f"    worker: {breakdown(r.worker, r.nodes)}")
        print(f"    client: {breakdown(r.client, r.nodes)}")
        if r.other:
            print(f"    unattributed: {breakdown(r.other, r.nodes)}")
        print(f"    SDK retries (attempt > 1, included above): "
              f"{dict(r.retries) if r.retries else 'none'}")
        same_worker = r.worker == r.worker_counter
        same_client = r.client == r.client_counter
        print(f"    cross-check, client-side counters: worker {sum(r.worker_counter.values())} "
              f"({'matches' if same_worker else 'DIFFERS'}), client "
              f"{sum(r.client_counter.values())} ({'matches' if same_client else 'DIFFERS'})")
        for label, a, b in (("worker", r.worker, r.worker_counter),
                            ("client", r.client, r.client_counter)):
            if a != b:
                diff = {k: (a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b)
                        if a.get(k, 0) != b.get(k, 0)}
                print(f"      {label} differences (recorder, counter): {diff}")
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
        calls = sum(r.calls.values())
        rows.append([r.workers, r.nodes, f"{r.seconds:.2f}" if r.seconds else "-",
                     f"{rate:,.1f}" if rate else "FAIL",
                     f"{rate / base:.2f}x" if rate and base else "-",
                     per_node(calls, r.nodes) if r.nodes else "-"])
    print_table(["workers", "nodes", "seconds", "nodes/s", "vs 1 worker", "worker reqs/node"],
                rows)
    print(f"  The moto server runs in this benchmark's process (GIL-bound Python) on "
          f"{os.cpu_count()} CPUs shared with the\n  worker processes; it is the bottleneck, "
          "so more workers cannot scale linearly here. moto's SQS also\n  costs O(messages in "
          "the queue) per message sent or received (it recomputes queue attributes),\n  which "
          "real SQS does not: these are numbers for moto, not for AWS.")
    for r in results:
        if r.problems:
            print(f"  {r.workers} worker(s) problems: " + "; ".join(r.problems[:5]))


def print_targets(counts: list[CountResult], throughput: list[ThroughputResult]) -> None:
    print("\nTargets")
    for r in counts:
        label = f"{r.shape.name}: worker requests per node <= {TARGET_CALLS_PER_NODE:g}"
        value = r.worker_per_node()
        if value is None:
            verdict(label, "N/A" if SKIPPED in r.problems else "MISS",
                    "did not complete: " + "; ".join(r.problems[:2]))
        else:
            verdict(label, "PASS" if value <= TARGET_CALLS_PER_NODE else "MISS",
                    f"{value:.2f} (reference estimate {REFERENCE_CALLS_PER_NODE:g}; "
                    f"incl. client "
                    f"{(sum(r.worker.values()) + sum(r.client.values())) / r.nodes:.2f})")
    rates = {r.workers: r.rate() for r in throughput}
    if 1 in rates and max(rates) > 1:
        top = max(rates)
        if rates[1] and rates[top]:
            verdict(f"throughput {top}/1 workers", "INFO",
                    f"{rates[top]:,.0f} / {rates[1]:,.0f} nodes/s = {rates[top] / rates[1]:.2f}x "
                    "(no target; CPU-bound local server)")


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
    parser.add_argument("--throughput-runs", type=int, default=20,
                        help="20-branch fan-out/fan-in runs in the throughput mix, plus one "
                             "25-node chain per 5 of them (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="jobs at once per worker process (default %(default)s)")
    parser.add_argument("--in-flight", type=int, default=4,
                        help="throughput: runs unfinished at any time (a new one starts when "
                             "the oldest finishes); 0 starts all at once (default %(default)s)")
    parser.add_argument("--no-moto-lock", action="store_true",
                        help="do not serialise moto's DynamoDB requests (moto's DynamoDB is not "
                             "thread-safe; see serialize_moto_dynamodb)")
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
                        help="keep the worker logs and blueprints here (default: a temporary "
                             "directory, removed at the end)")
    args = parser.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        worker_counts = parse_ints(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    mix = throughput_mix(args.throughput_runs)
    budget = Budget(args.budget, args.timeout)

    print_header("AWS service calls per node and throughput (local moto server)")
    with tempfile.TemporaryDirectory(prefix="flowcraft-bench-") as scratch_text:
        scratch = Path(args.log_dir or scratch_text)
        scratch.mkdir(parents=True, exist_ok=True)
        # Before moto is imported: the recorder reads its file path once, at import.
        os.environ["MOTO_RECORDER_FILEPATH"] = str(scratch / "moto-recording.jsonl")
        os.environ["AWS_SDK_UA_APP_ID"] = CLIENT_APP  # our own requests, told apart
        from flowcraft.local import moto_server

        blueprint_dir = scratch / "blueprints"
        write_blueprints(blueprint_dir, [*shapes, *{s.id: s for s in mix}.values()])
        serialize_moto_recorder()
        if not args.no_moto_lock:
            serialize_moto_dynamodb()
        try:
            server = moto_server()
            endpoint = server.__enter__()
        except Exception as exc:
            print(f"cannot start moto: {exc}")
            return 1
        try:
            os.environ.update(endpoint.environment())
            print(f"moto server {endpoint.url} (in this process; DynamoDB requests "
                  f"{'NOT ' if args.no_moto_lock else ''}serialised, see --no-moto-lock); "
                  f"worker concurrency {args.concurrency}; time limit {args.timeout:g} s per "
                  "case\n", flush=True)
            counts: list[CountResult] = []
            if not args.skip_counts:
                for shape in shapes:
                    print(f"  counting {shape.name} x {args.runs} ...", end=" ", flush=True)
                    started = time.perf_counter()
                    limit = budget.timeout()
                    if limit is None:
                        r = CountResult(shape, args.runs, problems=[SKIPPED])
                    else:
                        r = count_case(endpoint.url, shape, args.runs, blueprint_dir, scratch,
                                       args.concurrency, limit)
                    counts.append(r)
                    state = (f"{sum(r.worker.values())} worker requests for {r.nodes} nodes"
                             if r.nodes else "FAIL: " + "; ".join(r.problems[:2]))
                    print(f"{state} ({time.perf_counter() - started:.1f} s)", flush=True)
            throughput: list[ThroughputResult] = []
            if not args.skip_throughput:
                for count in worker_counts:
                    print(f"  throughput, {count} worker process(es) ...", end=" ", flush=True)
                    limit = budget.timeout(reserve=30.0)
                    if limit is None:
                        r = ThroughputResult(count, problems=[SKIPPED])
                    else:
                        r = throughput_case(endpoint.url, count, mix, blueprint_dir, scratch,
                                            args.concurrency, args.in_flight, limit)
                    throughput.append(r)
                    print(f"{r.nodes} nodes in {r.seconds:.2f} s" if r.rate() else
                          ("" if SKIPPED in r.problems else "FAIL: ")
                          + "; ".join(r.problems[:2]), flush=True)
        finally:
            server.__exit__(None, None, None)

    if counts:
        print_counts(counts)
    if throughput:
        print_throughput(throughput, mix, args.in_flight)
    print(f"\nat the end: {load_average()}")
    print_targets(counts, throughput)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "counts": [{"shape": r.shape.name, "runs": r.runs, "nodes": r.nodes,
                        "worker": r.worker, "client": r.client, "other": r.other,
                        "workerCounter": r.worker_counter, "clientCounter": r.client_counter,
                        "problems": r.problems} for r in counts],
            "throughput": [{"workers": r.workers, "nodes": r.nodes, "seconds": r.seconds,
                            "nodesPerSecond": r.rate(), "workerCalls": r.calls,
                            "problems": r.problems} for r in throughput],
        }, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
