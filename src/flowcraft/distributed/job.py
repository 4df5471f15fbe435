"""The job message: which node of which run to execute.

Wire format (JSON, the TypeScript library's, so its clients can start runs)::

    {"runId": "...", "blueprintId": "...", "nodeId": "..."}

with optional ``attempt`` and ``isLastAttempt`` (the reference's), and
``iteration`` (ours: which loop iteration of the node the job is for; absent
means 0), and ``trace`` (ours: the W3C trace context of the span that enqueued
the job, ``{"traceparent": "...", "tracestate": "..."}``, present only while
tracing is on; a malformed one is dropped, never an error), and ``chunk`` (ours: the
chunk of a ``batch-scatter``'s map ledger the job runs, see
:mod:`flowcraft.distributed.ledger`; absent for a node's job). Unknown fields are
ignored, here and by the TypeScript library's adapters. On Azure the message text is base64 of
that JSON; :func:`parse_job` accepts plain JSON text too.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidJobError


@dataclass(frozen=True, slots=True)
class JobPayload:
    run_id: str
    blueprint_id: str
    node_id: str
    iteration: int = 0
    attempt: int | None = None
    is_last_attempt: bool | None = None
    trace: dict[str, str] | None = field(default=None, compare=False)
    """Where the job sits in its run's trace; not part of the job's identity."""
    chunk: int | None = None
    """For a map ledger's chunk job: which chunk of the node's map it runs."""

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "runId": self.run_id, "blueprintId": self.blueprint_id, "nodeId": self.node_id,
        }
        if self.iteration:
            body["iteration"] = self.iteration
        if self.attempt is not None:
            body["attempt"] = self.attempt
        if self.is_last_attempt is not None:
            body["isLastAttempt"] = self.is_last_attempt
        if self.trace:
            body["trace"] = self.trace
        if self.chunk is not None:
            body["chunk"] = self.chunk
        return body

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_base64(self) -> str:
        return base64.b64encode(self.to_json().encode()).decode("ascii")

    @property
    def key(self) -> str:
        """Identifies one execution: run, node and iteration."""
        chunk = "" if self.chunk is None else f":chunk-{self.chunk}"
        return f"{self.run_id}:{self.node_id}:{self.iteration}{chunk}"


def parse_job(body: str | bytes | dict[str, Any]) -> JobPayload:
    """Parse a message body; raise :class:`InvalidJobError` saying what is wrong."""
    data: Any = body
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidJobError("message body is not UTF-8 text") from None
    if isinstance(body, str):
        data = _decode_text(body)
    if not isinstance(data, dict):
        raise InvalidJobError(f"job must be a JSON object, got {type(data).__name__}")
    # Where the message names a run, the error does too: that run is failed with the reason.
    run_id = data.get("runId") if isinstance(data.get("runId"), str) else None
    missing = [k for k in ("runId", "blueprintId", "nodeId") if not data.get(k)]
    if missing:
        raise InvalidJobError(f"job is missing {', '.join(missing)}", run_id=run_id or None)
    for key in ("runId", "blueprintId", "nodeId"):
        if not isinstance(data[key], str):
            raise InvalidJobError(f"job field {key} must be a string", run_id=run_id)
    iteration = data.get("iteration", 0)
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise InvalidJobError("job field iteration must be a non-negative integer",
                              run_id=run_id)
    chunk = data.get("chunk")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool)
                              or chunk < 0):
        raise InvalidJobError("job field chunk must be a non-negative integer", run_id=run_id)
    attempt = data.get("attempt")
    return JobPayload(
        run_id=data["runId"],
        blueprint_id=data["blueprintId"],
        node_id=data["nodeId"],
        iteration=iteration,
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        is_last_attempt=data.get("isLastAttempt") if isinstance(data.get("isLastAttempt"), bool)
        else None,
        trace=_trace_field(data.get("trace")),
        chunk=chunk,
    )


def _trace_field(value: Any) -> dict[str, str] | None:
    """The W3C trace context fields of ``value``, or ``None`` if it carries none."""
    if not isinstance(value, dict) or not isinstance(value.get("traceparent"), str):
        return None
    return {key: value[key] for key in ("traceparent", "tracestate")
            if isinstance(value.get(key), str) and len(value[key]) <= 512}


def _decode_text(text: str) -> Any:
    stripped = text.strip()
    if stripped.startswith(("{", "[", '"')):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InvalidJobError(f"message is not valid JSON: {exc}") from None
    try:
        decoded = base64.b64decode(stripped, validate=True).decode("utf-8")
        return json.loads(decoded)
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValueError):
        preview = stripped[:60] + ("..." if len(stripped) > 60 else "")
        raise InvalidJobError(
            f"message is neither JSON nor base64-encoded JSON: {preview!r}"
        ) from None
