"""Cost of tracing per node: the in-process backend, tracing off vs on.

```sh
.venv/bin/python bench/tracing_overhead.py                  # chain and fan, 300 nodes, 5 repeats
.venv/bin/python bench/tracing_overhead.py --nodes 1000 --repeat 3
```

One worker (``InProcessAdapter``, no service latency, so only CPU is measured) runs a
chain (every node a local continuation) and a fan-out/fan-in (every branch a queued job)
with tracing off (the default: a shared no-op span), and on with the SDK's
``BatchSpanProcessor`` feeding an exporter that drops the spans (the cost in the worker;
sending happens on the processor's thread); then, tracing off, with INFO logs to
/dev/null in the human and the JSON format. Prints the best CPU time (this process, all
threads: other load on the machine does not count) per node of each and its difference
from the first.

Then the instrumentation of one node alone, as the job algorithm calls it (log context,
node span, claim/commit/enqueue service spans and counters, trace injection), timed
with ``timeit``, tracing off and on.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import time
import timeit
from collections.abc import Sequence
from typing import Any

from flowcraft import FlowRuntime, WorkflowBlueprint
from flowcraft.distributed.inprocess import InProcessAdapter
from flowcraft.observability import (
    configure_logging,
    configure_tracing,
    get_metrics,
    get_tracer,
    inject,
    log_context,
    service_call,
    shutdown_tracing,
)


async def step(ctx: Any) -> Any:
    return ctx.node_id


def chain(size: int) -> WorkflowBlueprint:
    ids = [f"n{i}" for i in range(size)]
    return WorkflowBlueprint.model_validate({
        "id": "chain", "nodes": [{"id": i, "uses": "step"} for i in ids],
        "edges": [{"source": a, "target": b} for a, b in itertools.pairwise(ids)]})


def fan(size: int) -> WorkflowBlueprint:
    branches = [f"b{i}" for i in range(size - 2)]
    return WorkflowBlueprint.model_validate({
        "id": "fan", "nodes": [{"id": i, "uses": "step"} for i in ("s", *branches, "j")],
        "edges": [*({"source": "s", "target": b} for b in branches),
                  *({"source": b, "target": "j"} for b in branches)]})


async def one_run(blueprint: WorkflowBlueprint) -> float:
    runtime = FlowRuntime(blueprints={blueprint.id: blueprint}, registry={"step": step})
    adapter = InProcessAdapter(runtime.options, concurrency=8, poll_wait_seconds=0.01)
    await adapter.start()
    try:
        started = time.process_time()
        run_id = await adapter.start_workflow(blueprint)
        result = await adapter.wait_for_result(run_id, timeout=300, poll_interval=0.01)
        elapsed = time.process_time() - started
    finally:
        await adapter.stop()
    assert result.status == "completed", result.status
    return elapsed


def tracing_on() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    configure_tracing(tracer_provider=provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)
    def logs(format: str) -> None:
        configure_logging(format, logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115

    modes = {
        "off": lambda: None,
        "traced": tracing_on,
        "human-logs(INFO)": lambda: logs("human"),
        "json-logs(INFO)": lambda: logs("json"),
    }
    print(f"{'shape':6} {'mode':18} {'CPU us/node':>12} {'+us/node':>9}")
    for name, build in (("chain", chain), ("fan", fan)):
        blueprint = build(args.nodes)
        baseline = None
        for mode, setup in modes.items():
            setup()
            asyncio.run(one_run(blueprint))  # warm-up
            best = min(asyncio.run(one_run(blueprint)) for _ in range(args.repeat))
            shutdown_tracing()
            configure_logging("human", logging.WARNING, stream=open(os.devnull, "w"))  # noqa: SIM115
            per_node = best / args.nodes * 1e6
            baseline = per_node if baseline is None else baseline
            print(f"{name:6} {mode:18} {per_node:12.1f} {per_node - baseline:9.1f}",
                  flush=True)
    print()
    for mode, setup in (("off", shutdown_tracing), ("traced", tracing_on)):
        setup()
        seconds = min(timeit.repeat(instrumentation, number=10_000, repeat=5)) / 10_000
        shutdown_tracing()
        print(f"instrumentation of one node, tracing {mode:6}: {seconds * 1e6:7.2f} us")


def instrumentation() -> None:
    """What the job algorithm adds around one queued node (see distributed/adapter.py)."""
    metrics = get_metrics()
    metrics.message_received(0.01, redelivered=False)
    with log_context(run_id="r", node_id="n", attempt=1, worker_id="w"), get_tracer(
    ).span_for_node("r", "bp", "n", 1, "w", parent=None) as span:
        with service_call("claim"):
            pass
        metrics.node_finished("completed", 0.001)
        get_tracer().annotate(outcome="completed")
        with service_call("commit"):
            pass
        inject()
        with service_call("enqueue"):
            pass
        span.set_outcome("completed")


if __name__ == "__main__":
    main()
