"""The ``flowcraft`` command.

``flowcraft run BLUEPRINT.json --registry module:attr --context '{...}'``
runs a blueprint in this process; ``flowcraft graph`` prints Mermaid;
``flowcraft demo`` runs the example order pipeline. Mistakes (a missing
file, a malformed blueprint, an unknown registry) print one clear line and
exit with status 2; a run that ends other than ``completed`` exits with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import select
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .analysis import generate_mermaid
from .blueprint import load_blueprint, load_blueprints
from .errors import FlowcraftError


class UsageError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


# -- shared helpers ----------------------------------------------------------------------------


def load_registry(specs: Sequence[str]) -> dict[str, Any]:
    """``module:attr`` or ``path/to/file.py:attr``; attr is a dict, a Flow, or a callable
    returning a dict."""
    registry: dict[str, Any] = {}
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        attr = attr or "registry"
        value = getattr(_import_spec_module("--registry", spec, module_name), attr, None)
        if value is None:
            raise UsageError(f"--registry {spec}: {module_name} has no attribute '{attr}'")
        if hasattr(value, "registry") and callable(value.registry):
            value = value.registry()
        elif callable(value) and not isinstance(value, Mapping):
            value = value()
        if not isinstance(value, Mapping):
            raise UsageError(f"--registry {spec}: expected a dict of uses key -> implementation")
        registry.update(value)
    return registry


def _import_spec_module(flag: str, spec: str, module_name: str) -> Any:
    """The module of a ``module:attr`` or ``path/to/file.py:attr`` flag value."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{flag} {spec}: no file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert loader_spec and loader_spec.loader
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[path.stem] = module
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{flag} {spec}: cannot import {module_name} ({exc})") from None


def parse_context(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--context {text}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--context is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--context must be a JSON object")
    return value


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str, sort_keys=False))


def _configure_logging(verbose: int, log_format: str | None = None) -> None:
    from .observability import configure_logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    try:
        configure_logging(log_format, level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- commands ----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import FlowRuntime

    blueprint = load_blueprint(args.blueprint)
    blueprints = load_blueprints(args.blueprints) if args.blueprints else {}
    if blueprints.get(blueprint.id, blueprint) != blueprint:
        other = next(file for file in sorted(Path(args.blueprints).glob("*.json"))
                     if load_blueprint(file).id == blueprint.id)
        raise UsageError(f"blueprint id '{blueprint.id}' is defined twice: in {args.blueprint} "
                         f"and in {other}; give one of them another \"id\" (or file name)")
    blueprints[blueprint.id] = blueprint
    store = None
    if args.events:
        from .events import InMemoryEventStore

        store = InMemoryEventStore()
    runtime = FlowRuntime(blueprints=blueprints, registry=load_registry(args.registry),
                          event_store=store)
    result = asyncio.run(runtime.run(blueprint, parse_context(args.context)))
    if store is not None:
        from .events import event_to_dict

        events = asyncio.run(store.events(result.run_id))
        Path(args.events).write_text(json.dumps([event_to_dict(e) for e in events], indent=1,
                                                default=str) + "\n")
    if args.json:
        # Strict JSON (no NaN/Infinity): the engine never lets such values into a result.
        print(json.dumps(result.to_dict(), indent=2, allow_nan=False))
    else:
        print(f"run {result.run_id}: {result.status}")
        for error in result.errors:
            print(f"  error in node '{error.node_id}' (attempt {error.attempt}): {error.message}")
        outputs = {k[len("_outputs."):]: v for k, v in result.context.items()
                   if k.startswith("_outputs.")}
        print("outputs:")
        for node_id, output in outputs.items():
            print(f"  {node_id}: {json.dumps(output, default=str)}")
        rest = {k: v for k, v in result.context.items() if not k.startswith(("_outputs.",
                                                                              "_inputs."))}
        if rest:
            print("context:")
            for key, value in rest.items():
                print(f"  {key}: {json.dumps(value, default=str)}")
    return 0 if result.status == "completed" else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import load_replay_source

    try:
        source = json.loads(Path(args.file).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{args.file} is not valid JSON: {exc}") from None
    try:
        steps = load_replay_source(source)
    except ValueError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    if args.step is not None:
        if not 0 <= args.step < len(steps):
            raise UsageError(f"--step {args.step}: the run has steps 0 to {len(steps) - 1}")
        print_json(steps[args.step].to_dict())
        return 0
    if args.json:
        print_json([step.to_dict() for step in steps])
        return 0
    for step in steps:
        print(step.describe())
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    print(generate_mermaid(load_blueprint(args.blueprint)), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .analysis import analyze_blueprint
    from .blueprint import check_blueprint
    from .lint import REGISTRY_CODES, lint_blueprint
    from .nodes.builtins import BUILTIN_NODES

    blueprint = load_blueprint(args.blueprint)
    registry = load_registry(args.registry) if args.registry else {}
    known = {**BUILTIN_NODES, **registry} if args.registry else None
    check_blueprint(blueprint, known)
    others = load_blueprints(args.blueprints) if args.blueprints else None
    issues = [issue for issue in lint_blueprint(blueprint, registry, others)
              # Without a registry, "not implemented" says nothing about the blueprint.
              if args.registry or issue.code not in REGISTRY_CODES]
    if issues:
        print(f"blueprint '{blueprint.id}': {len(issues)} issue(s)")
        for issue in issues:
            where = (f"node '{issue.node_id}'" if issue.node_id is not None
                     else f"edge #{issue.edge_index}" if issue.edge_index is not None else "")
            print(f"  {issue.code} {where}: {issue.message}".replace("  :", ":"))
        return 1
    analysis = analyze_blueprint(blueprint)
    print(f"blueprint '{blueprint.id}' is valid: {analysis.node_count} nodes, "
          f"{analysis.edge_count} edges, start {analysis.start_node_ids}, "
          f"terminal {analysis.terminal_node_ids}" + ("" if analysis.is_dag else ", has cycles"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(backend=args.backend, orders=args.orders, workers=args.workers, ui=args.ui)


# -- cloud commands ----------------------------------------------------------------------------


def _runtime_options(args: argparse.Namespace, *, need_registry: bool = True) -> Any:
    from .runtime import FlowRuntime

    if not getattr(args, "blueprints", None):
        raise UsageError("--blueprints DIR is required (the directory of blueprint JSON files)")
    blueprints = load_blueprints(args.blueprints)
    if not blueprints:
        raise UsageError(f"--blueprints {args.blueprints}: no *.json blueprints found")
    registry = load_registry(getattr(args, "registry", []) or [])
    if need_registry and not registry:
        raise UsageError("--registry MODULE:ATTR is required (the node implementations)")
    return FlowRuntime(blueprints=blueprints, registry=registry).options


def _settings(args: argparse.Namespace) -> Any:
    from .adapters.connect import AwsSettings

    if args.backend == "aws":
        return AwsSettings.resolve(
            region=args.region, endpoint_url=args.endpoint_url, queue_url=args.queue_url,
            queue_name=args.queue_name, context_table=args.context_table,
            status_table=args.status_table, coordination_table=args.coordination_table,
        )
    from .adapters.connect import AzureSettings

    return AzureSettings.resolve(
        storage_connection_string=args.storage_connection_string,
        cosmos_connection_string=args.cosmos_connection_string,
        redis_url=args.redis_url, queue_name=args.queue_name, database=args.database,
        context_container=args.context_container, status_container=args.status_container,
    )


def _adapter(args: argparse.Namespace, options: Any, **adapter_options: Any) -> Any:
    from .adapters import connect as backends

    if args.backend == "aws":
        return backends.aws_adapter(_settings(args), options, **adapter_options)
    return backends.azure_adapter(_settings(args), options, **adapter_options)


# Longest visibility timeout each queue accepts: a longer lease would let a message
# reappear while its node still runs.
_MAX_LEASE_SECONDS = {"aws": 43_200.0, "azure": 7 * 24 * 3600.0}


def _check_number(flag: str, value: float | None, *, least: float, greatest: float | None = None,
                  exclusive: bool = False) -> None:
    """A numeric flag in range, or one line naming the flag, the range and the value."""
    if value is None:
        return
    too_small = value <= least if exclusive else value < least
    if not math.isfinite(value) or too_small or (greatest is not None and value > greatest):
        bound = f"more than {least:g}" if exclusive else f"at least {least:g}"
        if greatest is not None:
            bound += f" and at most {greatest:g}"
        raise UsageError(f"{flag} must be {bound}, not {value:g}")


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_run_id(run_id: str) -> str:
    """A run id every backend can key on: 1-128 letters, digits, ``.``, ``_``, ``:``, ``-``
    (Cosmos DB ids may not hold ``/``, ``\\``, ``?``, ``#``; keys in logs stay readable)."""
    if not _RUN_ID.fullmatch(run_id):
        raise UsageError(f"--run-id {run_id!r}: use 1 to 128 letters, digits, '.', '_', ':' "
                         "or '-', starting with a letter or digit")
    return run_id


def _refuse_non_finite(constant: str) -> Any:
    raise UsageError(f"--context holds {constant}, which is not JSON and cannot be stored; "
                     "use null or a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UsageError(f"--context holds the number {text}, too large to store; "
                         "use a string")
    return value


def parse_start_context(text: str | None) -> dict[str, Any]:
    """``--context`` of ``start``: a JSON object (or ``@file``), parsed strictly (no NaN or
    Infinity) and checked as every run's initial context is, before any service is asked."""
    from .context import validate_initial_context
    from .errors import InvalidContextError

    if not text:
        return {}
    source = text
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--context {source}: {exc.strerror}") from None
    try:
        value = json.loads(text, parse_constant=_refuse_non_finite, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--context is not valid JSON: {exc}") from None
    except RecursionError:
        raise UsageError("--context is nested too deeply") from None
    if not isinstance(value, dict):
        raise UsageError("--context must be a JSON object")
    try:
        return validate_initial_context(value)
    except InvalidContextError as exc:
        raise UsageError(f"--context: {exc.message}") from None


def cmd_provision(args: argparse.Namespace) -> int:
    from .adapters import connect as backends

    async def provision() -> dict[str, Any]:
        settings = _settings(args)
        if args.backend == "aws":
            from .adapters.aws import AwsNames, provision_aws

            async with backends.aws_clients(settings) as (sqs, dynamodb):
                return await provision_aws(sqs, dynamodb, AwsNames(
                    settings.queue_name, settings.context_table, settings.status_table,
                    settings.coordination_table))
        return await backends.provision_azure(settings)

    result = asyncio.run(provision())
    created = result.get("created") or []
    print(f"provisioned {args.backend}: " + (", ".join(created) if created else
                                              "everything already existed"))
    for key, value in result.items():
        if key != "created":
            print(f"  {key}: {value}")
    return 0


WORKER_CALLS_PREFIX = "flowcraft worker: service calls "


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import Worker

    _check_number("--concurrency", args.concurrency, least=1)
    _check_number("--lease-seconds", args.lease_seconds, least=0, exclusive=True,
                  greatest=_MAX_LEASE_SECONDS[args.backend])
    _check_number("--poll-seconds", args.poll_seconds, least=1, greatest=20)
    options = _runtime_options(args)
    dependencies = load_dependencies(args.dependencies) if args.dependencies else None

    calls: Counter[str] = Counter()

    def announce(text: str) -> None:
        print(text, flush=True)

    worker = Worker.from_env(
        args.backend, registry=options.registry, blueprints=options.blueprints,
        dependencies=dependencies, settings=_settings(args), calls=calls, announce=announce,
        health_port=args.health_port, health_host=args.health_host,
        concurrency=args.concurrency, lease_seconds=args.lease_seconds,
        poll_wait_seconds=args.poll_seconds)

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
    value = getattr(_import_spec_module("--dependencies", spec, module_name), attr, None)
    if value is None:
        raise UsageError(f"--dependencies {spec}: {module_name} has no attribute '{attr}'")
    if not callable(value) and not isinstance(value, Mapping):
        raise UsageError(f"--dependencies {spec}: expected a mapping or a factory returning "
                         f"one, got {type(value).__name__}")
    return value


def cmd_start(args: argparse.Namespace) -> int:
    from .errors import RunAlreadyExistsError

    if args.run_id is not None:
        check_run_id(args.run_id)
    _check_number("--timeout", args.timeout, least=0, exclusive=True)
    initial_context = parse_start_context(args.context)
    options = _runtime_options(args, need_registry=False)
    if args.blueprint_id not in options.blueprints:
        raise UsageError(f"unknown blueprint id '{args.blueprint_id}' (found: "
                         f"{', '.join(sorted(options.blueprints))})")

    async def start() -> int:
        from .client import Client

        async with Client.from_settings(_settings(args), blueprints=options.blueprints) as client:
            try:
                run_id = await client.start(args.blueprint_id, initial_context, args.run_id)
            except RunAlreadyExistsError:
                raise UsageError(
                    f"run '{args.run_id}' already exists and was left as it is; choose another "
                    "--run-id, or leave it out for a new one") from None
            print(run_id, flush=True)
            if not args.wait:
                return 0
            if sys.stdout.isatty():
                await show_progress(client, run_id, args.timeout, sys.stdout)
            result = await client.adapter.wait_for_result(run_id, timeout=args.timeout)
            print_json(result.to_dict())
            return 0 if result.status == "completed" else 1

    return asyncio.run(start())


async def show_progress(client: Any, run_id: str, timeout: float, out: Any) -> None:
    """One line, rewritten in place, while the run goes: ``3/7 nodes done (running)``."""
    import time

    from .distributed.adapter import RESTING_STATUSES

    deadline = time.monotonic() + timeout
    delay = 0.05
    width = 0
    try:
        while True:
            status = await client.status(run_id)
            done, total = status.progress()
            line = f"{done}/{total} nodes done ({status.status})"
            out.write("\r" + line.ljust(width))
            out.flush()
            width = len(line)
            if status.status in RESTING_STATUSES or time.monotonic() >= deadline:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
    finally:
        if width:
            out.write("\n")
            out.flush()


def cmd_status(args: argparse.Namespace) -> int:
    from .runtime import RuntimeOptions

    async def status() -> int:
        async with _adapter(args, RuntimeOptions({}, {}, {})) as adapter:
            record = await adapter.get_run_status(args.run_id)
            if record is None:
                raise UsageError(f"no run '{args.run_id}' in the status store")
            output: dict[str, Any] = {"status": record}
            if args.context:
                from .context import public_view

                output["context"] = public_view(
                    await adapter.create_context(args.run_id).load() or {})
            print_json(output)
            return 0

    return asyncio.run(status())


def _client(args: argparse.Namespace, *, blueprints: Any = None) -> Any:
    from .client import Client

    return Client.from_settings(_settings(args), blueprints=blueprints)


def cmd_runs(args: argparse.Namespace) -> int:
    from .client import RUN_STATES

    if args.status is not None and args.status not in RUN_STATES:
        raise UsageError(f"--status {args.status}: use one of {', '.join(RUN_STATES)}")
    _check_number("--limit", args.limit, least=1, greatest=1000)

    async def runs() -> int:
        async with _client(args) as client:
            page = await client.list_runs(status=args.status, blueprint_id=args.blueprint,
                                          since=args.since, limit=args.limit,
                                          cursor=args.cursor)
        if args.json:
            print_json({"runs": [{"runId": r.run_id, "status": r.status,
                                  "blueprintId": r.blueprint_id,
                                  "lastUpdated": r.updated_at.isoformat() if r.updated_at
                                  else None} for r in page.items],
                        "nextCursor": page.next_cursor})
            return 0
        rows = [(r.run_id, r.status, r.blueprint_id or "-",
                 r.updated_at.isoformat(timespec="seconds") if r.updated_at else "-")
                for r in page.items]
        header = ("RUN ID", "STATUS", "BLUEPRINT", "LAST UPDATED")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}")
        return 0

    return asyncio.run(runs())


def cmd_cancel(args: argparse.Namespace) -> int:
    async def cancel() -> int:
        async with _client(args) as client:
            if await client.cancel(args.run_id, args.reason):
                print(f"run {args.run_id} cancelled")
                return 0
            status = await client.status(args.run_id)
            print(f"flowcraft: run {args.run_id} is {status.status} already; left as it is",
                  file=sys.stderr)
            return 1

    return asyncio.run(cancel())


def cmd_resume(args: argparse.Namespace) -> int:
    data = None
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError:
            raise UsageError(f"--data {args.data[:40]!r} is not JSON; quote it, e.g. "
                             "--data '{\"approved\": true}' or --data '\"yes\"'") from None
    options = _runtime_options(args, need_registry=False)

    async def resume() -> int:
        async with _client(args, blueprints=options.blueprints) as client:
            await client.resume(args.run_id, args.node_id, action=args.action, data=data)
        print(f"run {args.run_id}: node {args.node_id} resumed"
              + (f" with action {args.action!r}" if args.action else ""))
        return 0

    return asyncio.run(resume())


def cmd_reconcile(args: argparse.Namespace) -> int:
    _check_number("--every", args.every, least=0, exclusive=True)
    _check_number("--stalled-threshold", args.stalled_threshold, least=0)
    options = _runtime_options(args, need_registry=False)

    async def reconcile_once() -> int:
        async with _adapter(args, options) as adapter:
            stats = await _reconciler(args, adapter).run()
            _print_reconcile_stats(stats)
            return 0 if stats.failed_runs == 0 else 1

    try:
        if not args.every:
            return asyncio.run(reconcile_once())
        return asyncio.run(_reconcile_every(args, options))
    except KeyboardInterrupt:
        return 0


def _print_reconcile_stats(stats: Any) -> None:
    print(f"scanned {stats.scanned_items} runs, {stats.stalled_runs} stalled, "
          f"{stats.reconciled_runs} reconciled, {stats.failed_runs} failed", flush=True)


def _report_failed_pass(exc: Exception, seconds: float) -> None:
    reason = " ".join(str(exc).split())  # SDK messages may span lines
    print(f"flowcraft reconcile: pass failed ({type(exc).__name__}: {reason}); "
          f"next pass in {seconds:g} s", file=sys.stderr, flush=True)


async def _reconcile_every(args: argparse.Namespace, options: Any) -> int:
    """Pass after pass until SIGINT / SIGTERM. A service that is unreachable — at start or
    later — fails a pass, reported on one line, and the next pass comes on schedule; a
    mistake in the settings (a missing queue, a missing connection string) still ends the
    command at once."""
    import signal

    seconds = float(args.every)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    async def pause() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)

    while not stop.is_set():
        try:
            async with _adapter(args, options) as adapter:
                reconciler = _reconciler(args, adapter)
                while not stop.is_set():
                    try:
                        _print_reconcile_stats(await reconciler.run())
                    except Exception as exc:
                        _report_failed_pass(exc, seconds)
                    await pause()
        except (UsageError, FlowcraftError):
            raise
        except Exception as exc:  # connecting failed
            _report_failed_pass(exc, seconds)
            await pause()
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .runtime import RuntimeOptions
    from .ui.app import run_server

    # Blueprints draw the graphs; the registry is needed only to resume awaiting runs.
    options = (_runtime_options(args, need_registry=False) if args.blueprints
               else RuntimeOptions({}, {}, {}))
    return run_server(lambda: _adapter(args, options), host=args.host, port=args.port,
                      allow_actions=args.allow_actions)


def _reconciler(args: argparse.Namespace, adapter: Any) -> Any:
    if args.backend == "aws":
        from .adapters.aws import create_sqs_reconciler

        return create_sqs_reconciler(adapter, adapter.dynamodb, adapter.status_table_name,
                                     args.stalled_threshold)
    from .adapters.azure import create_azure_reconciler

    return create_azure_reconciler(adapter, adapter.cosmos_client, adapter.cosmos_database_name,
                                   adapter.status_container_name, args.stalled_threshold)


def _add_cloud_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backend", choices=["aws", "azure"])
    aws = parser.add_argument_group("AWS (default: environment variables, then the setup "
                                    "guide's names)")
    aws.add_argument("--region", help="AWS region (AWS_REGION)")
    aws.add_argument("--endpoint-url", help="AWS endpoint, e.g. a local moto server "
                                            "(AWS_ENDPOINT_URL)")
    aws.add_argument("--queue-url", help="SQS queue URL (SQS_QUEUE_URL); else looked up by name")
    aws.add_argument("--context-table", help="context table (flowcraft-contexts)")
    aws.add_argument("--status-table", help="status table (flowcraft-statuses)")
    aws.add_argument("--coordination-table", help="coordination table (flowcraft-coordination)")
    azure = parser.add_argument_group("Azure")
    azure.add_argument("--storage-connection-string",
                       help="storage account (AZURE_STORAGE_CONNECTION_STRING)")
    azure.add_argument("--cosmos-connection-string", help="Cosmos DB (COSMOS_DB_CONNECTION_STRING)")
    azure.add_argument("--redis-url", help="Redis (REDIS_CONNECTION_STRING)")
    azure.add_argument("--database", help="Cosmos database (flowcraft-db)")
    azure.add_argument("--context-container", help="context container (contexts)")
    azure.add_argument("--status-container", help="status container (statuses)")
    parser.add_argument("--queue-name", help="queue name (flowcraft-jobs)")


def _register_cloud_commands(commands: Any) -> None:
    provision = commands.add_parser("provision", help="create the queue, tables / containers")
    _add_cloud_options(provision)
    provision.set_defaults(handler=cmd_provision)

    worker = commands.add_parser("worker", help="process jobs until SIGINT / SIGTERM")
    _add_cloud_options(worker)
    worker.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR")
    worker.add_argument("--blueprints", metavar="DIR", help="directory of blueprint JSON files")
    worker.add_argument("--concurrency", type=int, default=8, help="jobs at once (8)")
    worker.add_argument("--log-format", choices=("human", "json"), default=None,
                        help="log lines as text or one JSON object each "
                             "(default: $FLOWCRAFT_LOG_FORMAT, else human)")
    worker.add_argument("--health-port", type=int, default=None, metavar="PORT",
                        help="serve /healthz, /readyz and /metrics on this port (0: any)")
    worker.add_argument("--health-host", default="127.0.0.1",
                        help="address of the health server (127.0.0.1; 0.0.0.0 in a pod)")
    worker.add_argument("--lease-seconds", type=float, default=60.0,
                        help="node lease / message visibility, renewed while a node runs (60)")
    worker.add_argument("--poll-seconds", type=float, default=20.0,
                        help="longest wait of one receive on an empty queue; a stopping "
                             "worker waits for it (20)")
    worker.add_argument("--dependencies", metavar="MODULE:FACTORY",
                        help="objects for nodes (ctx.dependencies): a mapping, or a factory "
                             "returning one or an async context manager yielding one")
    worker.set_defaults(handler=cmd_worker)

    start = commands.add_parser("start", help="start a run; prints its id")
    _add_cloud_options(start)
    start.add_argument("blueprint_id")
    start.add_argument("--blueprints", metavar="DIR", help="directory of blueprint JSON files")
    start.add_argument("--context", help="initial context as JSON, or @file.json")
    start.add_argument("--run-id", help="use this run id instead of a new UUID")
    start.add_argument("--wait", action="store_true", help="wait for the result and print it")
    start.add_argument("--timeout", type=float, default=300.0, help="with --wait (300 s)")
    start.set_defaults(handler=cmd_start)

    status = commands.add_parser("status", help="show a run's status record")
    _add_cloud_options(status)
    status.add_argument("run_id")
    status.add_argument("--context", action="store_true", help="also print the run's context")
    status.set_defaults(handler=cmd_status)

    runs = commands.add_parser("runs", help="list runs, newest first (through the status "
                                             "index)")
    _add_cloud_options(runs)
    runs.add_argument("--status", help="running, awaiting, completed, failed or cancelled")
    runs.add_argument("--blueprint", help="only runs of this blueprint id")
    runs.add_argument("--since", metavar="ISO_TIME", help="only runs updated since then")
    runs.add_argument("--limit", type=int, default=50, help="runs per page (50)")
    runs.add_argument("--cursor", help="the next page (printed after a full page)")
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(handler=cmd_runs)

    cancel = commands.add_parser("cancel", help="cancel a running or awaiting run")
    _add_cloud_options(cancel)
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="cancelled from the command line")
    cancel.set_defaults(handler=cmd_cancel)

    resume = commands.add_parser("resume", help="resume a wait node of an awaiting run")
    _add_cloud_options(resume)
    resume.add_argument("run_id")
    resume.add_argument("node_id")
    resume.add_argument("--blueprints", metavar="DIR", help="directory of blueprint JSON files")
    resume.add_argument("--action", help="the action to route from the node")
    resume.add_argument("--data", metavar="JSON", help="the node's output, as JSON")
    resume.set_defaults(handler=cmd_resume)

    reconcile = commands.add_parser("reconcile", help="resume stalled runs")
    _add_cloud_options(reconcile)
    reconcile.add_argument("--blueprints", metavar="DIR", help="directory of blueprint JSON files")
    reconcile.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR")
    reconcile.add_argument("--every", type=float, metavar="SECONDS",
                           help="repeat every SECONDS until interrupted")
    reconcile.add_argument("--stalled-threshold", type=float, default=300.0, metavar="SECONDS",
                           help="a running run not updated for this long is stalled (300)")
    reconcile.set_defaults(handler=cmd_reconcile)

    ui = commands.add_parser("ui", help="a live view of runs in the browser")
    _add_cloud_options(ui)
    ui.add_argument("--blueprints", metavar="DIR", help="blueprint JSON files (draws graphs)")
    ui.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR",
                    help="node implementations (needed to resume awaiting runs)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    ui.add_argument("--port", type=int, default=8080, help="port (8080)")
    ui.add_argument("--allow-actions", action="store_true",
                    help="let the page cancel and resume runs (read-only without)")
    ui.set_defaults(handler=cmd_ui)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowcraft",
        description="Run declarative workflow graphs in memory or over AWS / Azure services.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"flowcraft {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a blueprint in this process")
    run.add_argument("blueprint", help="blueprint JSON file")
    run.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR",
                     help="node implementations (module:attr or file.py:attr; repeatable)")
    run.add_argument("--context", help="initial context as JSON, or @file.json")
    run.add_argument("--blueprints", help="directory of further blueprints (for subflows)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--events", metavar="FILE",
                     help="write the run's event log (JSON) to FILE, for flowcraft replay")
    run.set_defaults(handler=cmd_run)

    replay = commands.add_parser("replay", help="print a run's steps from a saved event log "
                                                "or run context")
    replay.add_argument("file", help="JSON: an event list (run --events), a run context or "
                                     "result (status --context, run --json)")
    replay.add_argument("--step", type=int, help="print the state after this step (JSON)")
    replay.add_argument("--json", action="store_true", help="print every step as JSON")
    replay.set_defaults(handler=cmd_replay)

    graph = commands.add_parser("graph", help="print a blueprint as a Mermaid flowchart")
    graph.add_argument("blueprint", help="blueprint JSON file")
    graph.set_defaults(handler=cmd_graph)

    validate = commands.add_parser("validate", help="check a blueprint (and its registry)")
    validate.add_argument("blueprint", help="blueprint JSON file")
    validate.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR")
    validate.add_argument("--blueprints", metavar="DIR",
                          help="the other blueprints, to check subflow blueprint ids")
    validate.set_defaults(handler=cmd_validate)

    demo = commands.add_parser("demo", help="run the example order pipeline end to end")
    demo.add_argument("--backend", choices=DEMO_BACKENDS, default=DEFAULT_DEMO_BACKEND)
    demo.add_argument("--orders", type=int, default=6, help="how many orders to run")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (distributed)")
    demo.add_argument("--ui", action="store_true",
                      help="serve the run view on http://127.0.0.1:8080/ until Ctrl-C")
    demo.set_defaults(handler=cmd_demo)

    _register_cloud_commands(commands)
    return parser


DEMO_BACKENDS = ["aws-local", "memory", "azure-local"]
DEFAULT_DEMO_BACKEND = "aws-local"


# Errors of the service SDKs (unreachable endpoint, missing credentials, refused request)
# are one line for the user, not a traceback.
_SERVICE_ERROR_MODULES = {"botocore", "aiobotocore", "azure", "redis", "aiohttp"}


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (rather than, say, a socket of a
    service call breaking)."""
    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .observability import configure_tracing, shutdown_tracing

    try:
        _configure_logging(args.verbose, getattr(args, "log_format", None))
        configure_tracing()  # OTEL_TRACES_EXPORTER; off (and nothing imported) when unset
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():
            print(f"flowcraft: {exc}", file=sys.stderr)
            return 2
        # `flowcraft status ... | head`: stop quietly with SIGPIPE's status, as Unix tools do.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except UsageError as exc:
        print(f"flowcraft: {exc}", file=sys.stderr)
        return 2
    except FlowcraftError as exc:
        print(f"flowcraft: {exc}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as exc:
        print(f"flowcraft: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__module__.split(".")[0] in _SERVICE_ERROR_MODULES:
            print(f"flowcraft: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("flowcraft: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_tracing()  # send the spans still buffered


if __name__ == "__main__":
    sys.exit(main())

