"""What every ``flowcraft`` command shares: the usage error, registries, ``--context``,
number flags, the blueprints of ``--blueprints DIR``, connection settings from flags.

A :class:`UsageError` is a mistake on the command line: ``main`` prints it as one line
and exits with status 2. Nothing here talks to a service.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A user mistake on the command line: printed as one line, exit status 2."""


def load_registry(specs: Sequence[str]) -> dict[str, Any]:
    """``module:attr`` or ``path/to/file.py:attr``; attr is a dict, a Flow, or a callable
    returning a dict."""
    registry: dict[str, Any] = {}
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        attr = attr or "registry"
        value = getattr(import_spec_module("--registry", spec, module_name), attr, None)
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


def import_spec_module(flag: str, spec: str, module_name: str) -> Any:
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


def check_number(flag: str, value: float | None, *, least: float, greatest: float | None = None,
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


def runtime_options(args: argparse.Namespace, *, need_registry: bool = True) -> Any:
    """The runtime options of ``--blueprints DIR`` and ``--registry`` (required unless
    ``need_registry`` is false)."""
    from ..blueprint import load_blueprints
    from ..runtime import FlowRuntime

    if not getattr(args, "blueprints", None):
        raise UsageError("--blueprints DIR is required (the directory of blueprint JSON files)")
    blueprints = load_blueprints(args.blueprints)
    if not blueprints:
        raise UsageError(f"--blueprints {args.blueprints}: no *.json blueprints found")
    registry = load_registry(getattr(args, "registry", []) or [])
    if need_registry and not registry:
        raise UsageError("--registry MODULE:ATTR is required (the node implementations)")
    return FlowRuntime(blueprints=blueprints, registry=registry).options


def settings(args: argparse.Namespace) -> Any:
    """The connection settings of a cloud command: its flags, else the environment."""
    from ..adapters.connect import AwsSettings, AzureSettings

    if args.backend == "aws":
        return AwsSettings.resolve(
            region=args.region, endpoint_url=args.endpoint_url, queue_url=args.queue_url,
            queue_name=args.queue_name, context_table=args.context_table,
            status_table=args.status_table, coordination_table=args.coordination_table,
            payload_bucket=args.payload_bucket,
        )
    return AzureSettings.resolve(
        storage_connection_string=args.storage_connection_string,
        cosmos_connection_string=args.cosmos_connection_string,
        redis_url=args.redis_url, queue_name=args.queue_name, database=args.database,
        context_container=args.context_container, status_container=args.status_container,
        payload_container=args.payload_container,
    )
