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
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
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
        try:
            if module_name.endswith(".py"):
                path = Path(module_name)
                if not path.is_file():
                    raise UsageError(f"--registry {spec}: no file {path}")
                loader_spec = importlib.util.spec_from_file_location(path.stem, path)
                assert loader_spec and loader_spec.loader
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[path.stem] = module
                loader_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"--registry {spec}: cannot import {module_name} ({exc})") from None
        value = getattr(module, attr, None)
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


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- commands ----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import FlowRuntime

    blueprint = load_blueprint(args.blueprint)
    blueprints = load_blueprints(args.blueprints) if args.blueprints else {}
    blueprints.setdefault(blueprint.id, blueprint)
    runtime = FlowRuntime(blueprints=blueprints, registry=load_registry(args.registry))
    result = asyncio.run(runtime.run(blueprint, parse_context(args.context)))
    if args.json:
        print_json(result.to_dict())
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


def cmd_graph(args: argparse.Namespace) -> int:
    print(generate_mermaid(load_blueprint(args.blueprint)), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .analysis import analyze_blueprint

    blueprint = load_blueprint(args.blueprint)
    if args.registry:
        from .blueprint import check_registry
        from .nodes.builtins import BUILTIN_NODES

        check_registry(blueprint, {**BUILTIN_NODES, **load_registry(args.registry)})
    analysis = analyze_blueprint(blueprint)
    print(f"blueprint '{blueprint.id}' is valid: {analysis.node_count} nodes, "
          f"{analysis.edge_count} edges, start {analysis.start_node_ids}, "
          f"terminal {analysis.terminal_node_ids}" + ("" if analysis.is_dag else ", has cycles"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(backend=args.backend, orders=args.orders, workers=args.workers)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowcraft",
        description="Run declarative workflow graphs in memory or over AWS / Azure services.",
    )
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
    run.set_defaults(handler=cmd_run)

    graph = commands.add_parser("graph", help="print a blueprint as a Mermaid flowchart")
    graph.add_argument("blueprint", help="blueprint JSON file")
    graph.set_defaults(handler=cmd_graph)

    validate = commands.add_parser("validate", help="check a blueprint (and its registry)")
    validate.add_argument("blueprint", help="blueprint JSON file")
    validate.add_argument("--registry", action="append", default=[], metavar="MODULE:ATTR")
    validate.set_defaults(handler=cmd_validate)

    demo = commands.add_parser("demo", help="run the example order pipeline end to end")
    demo.add_argument("--backend", choices=DEMO_BACKENDS, default=DEFAULT_DEMO_BACKEND)
    demo.add_argument("--orders", type=int, default=6, help="how many orders to run")
    demo.add_argument("--workers", type=int, default=3, help="worker processes (distributed)")
    demo.set_defaults(handler=cmd_demo)

    for register in EXTRA_COMMANDS:
        register(commands)
    return parser


DEMO_BACKENDS = ["memory"]
DEFAULT_DEMO_BACKEND = "memory"
EXTRA_COMMANDS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"flowcraft: {exc}", file=sys.stderr)
        return 2
    except FlowcraftError as exc:
        print(f"flowcraft: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowcraft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

