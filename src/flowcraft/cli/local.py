"""The commands that need no service: ``run``, ``replay``, ``graph`` and ``validate``.

Each runs in this process on blueprint files (and a registry, for ``run`` and
``validate --registry``); ``run`` exits with 1 when the run ends other than
``completed``, ``validate`` with 1 when the linter finds issues.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from ..blueprint import load_blueprint, load_blueprints
from .common import UsageError, load_registry, parse_context, print_json


def cmd_run(args: argparse.Namespace) -> int:
    from ..runtime import FlowRuntime

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
        from ..events import InMemoryEventStore

        store = InMemoryEventStore()
    runtime = FlowRuntime(blueprints=blueprints, registry=load_registry(args.registry),
                          event_store=store)
    result = asyncio.run(runtime.run(blueprint, parse_context(args.context)))
    if store is not None:
        from ..events import event_to_dict

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
    from ..replay import load_replay_source

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
    from ..analysis import generate_mermaid

    print(generate_mermaid(load_blueprint(args.blueprint)), end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..analysis import analyze_blueprint
    from ..blueprint import check_blueprint
    from ..lint import REGISTRY_CODES, lint_blueprint
    from ..nodes.builtins import BUILTIN_NODES

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
