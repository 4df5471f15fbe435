"""``flowcraft worker aws|azure``: a :class:`~flowcraft.worker.Worker` from the flags.

The worker runs until SIGINT or SIGTERM and, on leaving, prints one line
``flowcraft worker: service calls {...}`` with the requests its service clients sent.
While it runs, ``--health-port`` serves the same counts (and more) as JSON on
``/stats``; programs read that rather than the line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .common import UsageError, check_number, import_spec_module, runtime_options, settings

WORKER_CALLS_PREFIX = "flowcraft worker: service calls "

# Longest visibility timeout each queue accepts: a longer lease would let a message
# reappear while its node still runs.
MAX_LEASE_SECONDS = {"aws": 43_200.0, "azure": 7 * 24 * 3600.0}


def cmd_worker(args: argparse.Namespace) -> int:
    from ..worker import Worker

    check_number("--concurrency", args.concurrency, least=1)
    check_number("--lease-seconds", args.lease_seconds, least=0, exclusive=True,
                 greatest=MAX_LEASE_SECONDS[args.backend])
    check_number("--poll-seconds", args.poll_seconds, least=1, greatest=20)
    check_number("--map-ledger-min-items", args.map_ledger_min_items, least=1)
    check_number("--map-chunk-items", args.map_chunk_items, least=1)
    options = runtime_options(args)
    dependencies = load_dependencies(args.dependencies) if args.dependencies else None

    calls: Counter[str] = Counter()

    def announce(text: str) -> None:
        print(text, flush=True)

    worker = Worker.from_env(
        args.backend, registry=options.registry, blueprints=options.blueprints,
        dependencies=dependencies, settings=settings(args), calls=calls, announce=announce,
        health_port=args.health_port, health_host=args.health_host,
        concurrency=args.concurrency, lease_seconds=args.lease_seconds,
        poll_wait_seconds=args.poll_seconds, map_ledger_min_items=args.map_ledger_min_items,
        map_chunk_items=args.map_chunk_items, lean_writes=not args.no_lean_writes)

    async def work() -> None:
        await worker.run()
        announce(f"{WORKER_CALLS_PREFIX}{json.dumps(dict(calls), sort_keys=True)}")

    asyncio.run(work())
    return 0


def load_dependencies(spec: str) -> Any:
    """``--dependencies MODULE:FACTORY`` (or ``file.py:FACTORY``): a mapping, or a callable
    returning one — directly, awaited, or as an async context manager."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--dependencies {spec}: use MODULE:FACTORY (or path/to/file.py:FACTORY)")
    value = getattr(import_spec_module("--dependencies", spec, module_name), attr, None)
    if value is None:
        raise UsageError(f"--dependencies {spec}: {module_name} has no attribute '{attr}'")
    if not callable(value) and not isinstance(value, Mapping):
        raise UsageError(f"--dependencies {spec}: expected a mapping or a factory returning "
                         f"one, got {type(value).__name__}")
    return value
