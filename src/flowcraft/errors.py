"""Every error flowcraft raises derives from :class:`FlowcraftError`.

Errors carry the run id and node id they concern where one is known, so a log
line or a traceback always says *which* run and *which* node went wrong.
"""

from __future__ import annotations

from collections.abc import Iterable


class FlowcraftError(Exception):
    """Base class of every error raised by flowcraft."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        node_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.node_id = node_id


class BlueprintValidationError(FlowcraftError, ValueError):
    """A blueprint is malformed. ``problems`` lists every problem found, not just the first."""

    def __init__(self, blueprint_id: str | None, problems: Iterable[str]) -> None:
        self.blueprint_id = blueprint_id
        self.problems = list(problems)
        name = f"blueprint '{blueprint_id}'" if blueprint_id else "blueprint"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{name} is invalid ({len(self.problems)} problem(s)):\n{lines}")


class ExpressionError(FlowcraftError, ValueError):
    """An edge condition, transform or loop condition could not be parsed or evaluated."""

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        self.expression = expression
        super().__init__(message)


class NodeExecutionError(FlowcraftError):
    """A node failed after its last attempt and had no fallback (or the fallback failed too)."""

    def __init__(
        self,
        message: str,
        *,
        node_id: str,
        run_id: str | None = None,
        attempt: int | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message, run_id=run_id, node_id=node_id)
        self.attempt = attempt
        self.__cause__ = cause


class NodeTimeoutError(FlowcraftError, TimeoutError):
    """One attempt of a node ran longer than its ``timeout``."""


class UnknownBlueprintError(FlowcraftError, KeyError):
    """A run or a job names a blueprint id the runtime does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class ContextTooLargeError(FlowcraftError):
    """A run's context no longer fits the storage backend's item limit."""

    def __init__(self, run_id: str, size_bytes: int, limit_bytes: int, backend: str) -> None:
        super().__init__(
            f"context of run '{run_id}' is {size_bytes} bytes, over the {backend} item limit "
            f"of {limit_bytes} bytes; keep large payloads elsewhere (an object store) and put "
            "a reference in the context",
            run_id=run_id,
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class InvalidJobError(FlowcraftError):
    """A queue message is not a valid job (unparseable, missing fields, wrong types)."""


class BlueprintVersionMismatchError(FlowcraftError):
    """A run was started with another version of the blueprint than this worker has."""


class UnstorableValueError(FlowcraftError, TypeError):
    """A value cannot be stored in a run's context: it is not JSON (NaN, Infinity, bytes,
    Decimal, datetime, set, an arbitrary object, a circular reference, ...).

    ``path`` says where inside the value the problem is (``$.items[3].price``)."""

    def __init__(self, message: str, *, path: str = "$", run_id: str | None = None,
                 node_id: str | None = None) -> None:
        super().__init__(message, run_id=run_id, node_id=node_id)
        self.path = path


class RunAlreadyExistsError(FlowcraftError):
    """A run was started with the id of a run that already exists; the existing run is
    left untouched."""


class InvalidContextError(FlowcraftError, ValueError):
    """An initial context cannot start a run: it holds keys the engine owns, or values that
    cannot be stored. Nothing was started."""


class InvalidOptionError(FlowcraftError, ValueError):
    """An argument of a runtime call is out of range (a negative ``concurrency``, ...)."""


class NonRetryableError(FlowcraftError):
    """Raise it (or a subclass) from a node for a failure another attempt cannot fix (bad
    input, a declined payment): no further attempts are made; the fallback still runs."""
