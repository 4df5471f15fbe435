"""Failure details small enough to store with a failed node's record."""

from __future__ import annotations

import json
import traceback
from typing import Any

MAX_ERROR_BYTES = 4096
_MAX_MESSAGE_BYTES = 1024
_CUT = "...\n"


def format_error(exc: BaseException, *, max_bytes: int = MAX_ERROR_BYTES) -> dict[str, str]:
    """``{"type", "message", "traceback"}`` of ``exc``, at most ``max_bytes`` as JSON.

    The message keeps its start; the traceback keeps its end (the innermost frames and
    the exception line are what tell where it broke), each cut marked with ``...``.
    """
    error_type = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        error_type = f"{module}.{error_type}"
    message = _fit_start(str(exc), min(_MAX_MESSAGE_BYTES, max_bytes // 4))
    trace = "".join(traceback.format_exception(exc))
    fixed = _size({"type": error_type, "message": message, "traceback": ""})
    if fixed > max_bytes:  # a pathological type name: keep the shape, drop the rest
        return {"type": _fit_start(error_type, max_bytes // 4), "message": "",
                "traceback": ""}
    return {"type": error_type, "message": message,
            "traceback": _fit_end(trace, max_bytes - fixed)}


def _size(value: Any) -> int:
    return len(json.dumps(value).encode())


def _fit_start(text: str, budget: int) -> str:
    """``text``, or its start plus ``...``, whose JSON string form fits in ``budget`` bytes."""
    if _size(text) - 2 <= budget:
        return text
    keep = max(0, budget - len(_CUT))
    while keep > 0 and _size(text[:keep] + "...") - 2 > budget:
        keep -= max(1, (_size(text[:keep] + "...") - 2 - budget) // 6)
    return text[:max(0, keep)] + "..." if keep > 0 else ""


def _fit_end(text: str, budget: int) -> str:
    """``text``, or ``...`` plus its end, whose JSON string form fits in ``budget`` bytes."""
    if _size(text) - 2 <= budget:
        return text
    keep = max(0, budget - len(_CUT))
    while keep > 0 and _size(_CUT + text[-keep:]) - 2 > budget:
        keep -= max(1, (_size(_CUT + text[-keep:]) - 2 - budget) // 6)
    return _CUT + text[-keep:] if keep > 0 else ""
