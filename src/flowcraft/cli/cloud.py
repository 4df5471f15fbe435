"""The commands on a backend's services: ``provision``, ``start``, ``status``, ``runs``,
``cancel``, ``resume``, ``reconcile`` and ``ui`` (``worker`` has a module of its own).

Each resolves its connection settings from the flags and the environment
(:func:`~flowcraft.cli.common.settings`) and opens what it needs through
:mod:`flowcraft.adapters.connect` — a :class:`~flowcraft.client.Client`, an adapter or a
reconciler — closing it before it returns. Flags are checked before any service is
asked, so a mistake there touches nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import FlowcraftError
from .common import UsageError, check_number, print_json, runtime_options, settings

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
    from ..context import validate_initial_context
    from ..errors import InvalidContextError

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


def _adapter(args: argparse.Namespace, options: Any) -> Any:
    from ..adapters.connect import open_adapter

    return open_adapter(settings(args), options)


def _client(args: argparse.Namespace, *, blueprints: Any = None) -> Any:
    from ..client import Client

    return Client.from_settings(settings(args), blueprints=blueprints)


def cmd_provision(args: argparse.Namespace) -> int:
    from ..adapters.connect import provision

    result = asyncio.run(provision(settings(args)))
    created = result.get("created") or []
    print(f"provisioned {args.backend}: " + (", ".join(created) if created else
                                              "everything already existed"))
    for key, value in result.items():
        if key != "created":
            print(f"  {key}: {value}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from ..errors import RunAlreadyExistsError

    if args.run_id is not None:
        check_run_id(args.run_id)
    check_number("--timeout", args.timeout, least=0, exclusive=True)
    initial_context = parse_start_context(args.context)
    options = runtime_options(args, need_registry=False)
    if args.blueprint_id not in options.blueprints:
        raise UsageError(f"unknown blueprint id '{args.blueprint_id}' (found: "
                         f"{', '.join(sorted(options.blueprints))})")

    async def start() -> int:
        async with _client(args, blueprints=options.blueprints) as client:
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

    from ..distributed.adapter import RESTING_STATUSES

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
    from ..runtime import RuntimeOptions

    async def status() -> int:
        async with _adapter(args, RuntimeOptions({}, {}, {})) as adapter:
            record = await adapter.get_run_status(args.run_id)
            if record is None:
                raise UsageError(f"no run '{args.run_id}' in the status store")
            output: dict[str, Any] = {"status": record}
            if args.context:
                from ..context import public_view

                output["context"] = public_view(
                    await adapter.create_context(args.run_id).load() or {})
            print_json(output)
            return 0

    return asyncio.run(status())


def cmd_runs(args: argparse.Namespace) -> int:
    from ..client import RUN_STATES

    if args.status is not None and args.status not in RUN_STATES:
        raise UsageError(f"--status {args.status}: use one of {', '.join(RUN_STATES)}")
    check_number("--limit", args.limit, least=1, greatest=1000)

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
    options = runtime_options(args, need_registry=False)

    async def resume() -> int:
        async with _client(args, blueprints=options.blueprints) as client:
            await client.resume(args.run_id, args.node_id, action=args.action, data=data)
        print(f"run {args.run_id}: node {args.node_id} resumed"
              + (f" with action {args.action!r}" if args.action else ""))
        return 0

    return asyncio.run(resume())


def _reconciler(args: argparse.Namespace, options: Any) -> Any:
    from ..adapters.connect import open_reconciler

    return open_reconciler(settings(args), options, args.stalled_threshold)


def cmd_reconcile(args: argparse.Namespace) -> int:
    check_number("--every", args.every, least=0, exclusive=True)
    check_number("--stalled-threshold", args.stalled_threshold, least=0)
    options = runtime_options(args, need_registry=False)

    async def reconcile_once() -> int:
        async with _reconciler(args, options) as reconciler:
            stats = await reconciler.run()
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
            async with _reconciler(args, options) as reconciler:
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
    from ..runtime import RuntimeOptions
    from ..ui.app import run_server

    # Blueprints draw the graphs; the registry is needed only to resume awaiting runs.
    options = (runtime_options(args, need_registry=False) if args.blueprints
               else RuntimeOptions({}, {}, {}))
    return run_server(lambda: _adapter(args, options), host=args.host, port=args.port,
                      allow_actions=args.allow_actions)
