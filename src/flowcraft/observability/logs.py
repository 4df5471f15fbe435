"""Log lines that say which run, node, attempt and worker they belong to.

The job algorithm wraps each job in :func:`log_context`; the values live in
context variables, so every ``logging`` call made while the job runs — the
algorithm's, a node's own, a library's — carries them without being passed
anything, and concurrent jobs on one event loop never see each other's (each
asyncio task copies the context it was created in).

Two formatters read those variables: :class:`HumanFormatter` (the default:
``time level logger [run=... node=...]: message``) and :class:`JsonFormatter`
(one JSON object per line, for log pipelines). :func:`configure_logging`
installs one of them on the root logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["human", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("human", "json")
LOG_FORMAT_ENV = "FLOWCRAFT_LOG_FORMAT"

CONTEXT_FIELDS = ("run_id", "node_id", "attempt", "worker_id")
_fields: dict[str, ContextVar[Any]] = {
    name: ContextVar(f"flowcraft_log_{name}", default=None) for name in CONTEXT_FIELDS
}
_field_vars = tuple(_fields.values())
# Attributes every LogRecord has: anything else a caller passed in ``extra=`` is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


class log_context:
    """Tag every log line written inside the ``with`` block; ``None`` keeps the outer
    value. A class rather than a generator: it wraps every job, so it is kept cheap."""

    __slots__ = ("_tokens", "_values")

    def __init__(self, *, run_id: str | None = None, node_id: str | None = None,
                 attempt: int | None = None, worker_id: str | None = None) -> None:
        self._values = (run_id, node_id, attempt, worker_id)
        self._tokens: list[tuple[ContextVar[Any], Token[Any]]] = []

    def __enter__(self) -> None:
        self._tokens = [(var, var.set(value)) for var, value in zip(
            _field_vars, self._values, strict=True) if value is not None]

    def __exit__(self, *exc: object) -> None:
        for var, token in reversed(self._tokens):
            var.reset(token)
        self._tokens = []


def current_log_context() -> dict[str, Any]:
    """The fields set by the enclosing :func:`log_context` blocks (unset ones left out)."""
    return {name: value for name, var in _fields.items() if (value := var.get()) is not None}


class HumanFormatter(logging.Formatter):
    """``2026-01-01 12:00:00,123 INFO flowcraft.distributed [run=r1 node=a]: message``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(flowcraft_tags)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = current_log_context()
        tags = " ".join(f"{label}={context[name]}" for name, label in
                        (("run_id", "run"), ("node_id", "node"), ("attempt", "attempt"))
                        if name in context)
        record.flowcraft_tags = f" [{tags}]" if tags else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the context fields, the
    ``extra=`` fields of the call, and ``exception`` (the formatted traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current_log_context())
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key != "flowcraft_tags":
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve_log_format(value: str | None = None) -> LogFormat:
    """``value``, else ``$FLOWCRAFT_LOG_FORMAT``, else ``human``; a clear error otherwise."""
    chosen = (value or os.environ.get(LOG_FORMAT_ENV) or "human").strip().lower()
    if chosen not in LOG_FORMATS:
        source = "--log-format" if value else LOG_FORMAT_ENV
        raise ValueError(f"unknown log format {chosen!r} (from {source}); "
                         f"use one of: {', '.join(LOG_FORMATS)}")
    return chosen


def configure_logging(format: str | None = None, level: int | str = logging.WARNING, *,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``format`` (see
    :func:`resolve_log_format`) at ``level``; replaces handlers installed by an earlier
    call. Returns the handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_flowcraft", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if resolve_log_format(format) == "json"
                         else HumanFormatter())
    handler._flowcraft = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    return handler
