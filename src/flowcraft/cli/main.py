"""The ``flowcraft`` command: its parser and :func:`main`.

``flowcraft run BLUEPRINT.json --registry module:attr --context '{...}'``
runs a blueprint in this process; ``flowcraft graph`` prints Mermaid;
``flowcraft demo`` runs the example order pipeline. Mistakes (a missing
file, a malformed blueprint, an unknown registry) print one clear line and
exit with status 2; a run that ends other than ``completed`` exits with 1.

This module holds the parser (every command, flag and help text) and the
error handling every command shares; the commands themselves live in
:mod:`.local` (run, replay, graph, validate), :mod:`.demo`, :mod:`.cloud`
(provision, start, status, runs, cancel, resume, reconcile, ui) and
:mod:`.worker`, each importing only :mod:`.common` and the library.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import FlowcraftError
from .cloud import (
    cmd_cancel,
    cmd_provision,
    cmd_reconcile,
    cmd_resume,
    cmd_runs,
    cmd_start,
    cmd_status,
    cmd_ui,
)
from .common import UsageError
from .demo import DEFAULT_DEMO_BACKEND, DEMO_BACKENDS, cmd_demo
from .local import cmd_graph, cmd_replay, cmd_run, cmd_validate
from .worker import cmd_worker


def _configure_logging(verbose: int, log_format: str | None = None) -> None:
    from ..observability import configure_logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    try:
        configure_logging(log_format, level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    aws.add_argument("--payload-bucket", help="S3 bucket for values too large for a run's "
                                              "item (FLOWCRAFT_PAYLOAD_BUCKET; none: off)")
    azure = parser.add_argument_group("Azure")
    azure.add_argument("--storage-connection-string",
                       help="storage account (AZURE_STORAGE_CONNECTION_STRING)")
    azure.add_argument("--cosmos-connection-string", help="Cosmos DB (COSMOS_DB_CONNECTION_STRING)")
    azure.add_argument("--redis-url", help="Redis (REDIS_CONNECTION_STRING)")
    azure.add_argument("--database", help="Cosmos database (flowcraft-db)")
    azure.add_argument("--context-container", help="context container (contexts)")
    azure.add_argument("--status-container", help="status container (statuses)")
    azure.add_argument("--payload-container", help="blob container for values too large for "
                       "a run's item (FLOWCRAFT_PAYLOAD_CONTAINER; none: off)")
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
                        help="serve /healthz, /readyz, /metrics and /stats on this port "
                             "(0: any)")
    worker.add_argument("--health-host", default="127.0.0.1",
                        help="address of the health server (127.0.0.1; 0.0.0.0 in a pod)")
    worker.add_argument("--lease-seconds", type=float, default=60.0,
                        help="node lease / message visibility, renewed while a node runs (60)")
    worker.add_argument("--poll-seconds", type=float, default=20.0,
                        help="longest wait of one receive on an empty queue; a stopping "
                             "worker waits for it (20)")
    worker.add_argument("--map-ledger-min-items", type=int, default=32, metavar="N",
                        help="a batch-scatter over at least N items runs as a map ledger: its "
                             "items in chunks beside the run (32)")
    worker.add_argument("--map-chunk-items", type=int, default=100, metavar="N",
                        help="at most N items per chunk of a map ledger (100)")
    worker.add_argument("--no-lean-writes", action="store_true",
                        help="claims and commits always read the run back: while workers of "
                             "a version that does not count join arrivals still run")
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
    from .. import __version__

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
    demo.add_argument("--backend", choices=DEMO_BACKENDS, default=None,
                      help=f"where the runs go ({DEFAULT_DEMO_BACKEND}; memory when its "
                           "extras are not installed)")
    demo.add_argument("--orders", type=int, default=6, help="how many orders to run")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (distributed)")
    demo.add_argument("--ui", action="store_true",
                      help="serve the run view on http://127.0.0.1:8080/ until Ctrl-C")
    demo.set_defaults(handler=cmd_demo)

    _register_cloud_commands(commands)
    return parser


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
    from ..observability import configure_tracing, shutdown_tracing

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

