"""DynamoDB value conversion and update-expression building.

Values are converted to and from DynamoDB's attribute-value JSON directly:
numbers travel as their decimal text, so nodes get ``int`` and ``float``
back (never ``Decimal``), and floats need no Decimal context.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...context import PatchOperation, squash

ITEM_LIMIT_BYTES = 400 * 1024


def to_attribute(value: Any) -> dict[str, Any]:
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"DynamoDB cannot store the number {value!r}")
        return {"N": repr(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, bytes | bytearray):
        return {"B": bytes(value)}
    if isinstance(value, Mapping):
        return {"M": {str(k): to_attribute(v) for k, v in value.items()}}
    if isinstance(value, list | tuple | set | frozenset):
        return {"L": [to_attribute(v) for v in value]}
    if hasattr(value, "model_dump"):
        return to_attribute(value.model_dump(mode="json"))
    if hasattr(value, "isoformat"):
        return {"S": value.isoformat()}
    raise TypeError(f"cannot store a value of type {type(value).__name__} in the context")


def from_attribute(attribute: Mapping[str, Any]) -> Any:
    (kind, value), = attribute.items()
    if kind == "S":
        return value
    if kind == "N":
        return _number(value)
    if kind == "BOOL":
        return bool(value)
    if kind == "NULL":
        return None
    if kind == "M":
        return {k: from_attribute(v) for k, v in value.items()}
    if kind == "L":
        return [from_attribute(v) for v in value]
    if kind == "SS":
        return sorted(value)
    if kind == "NS":
        return sorted(_number(v) for v in value)
    if kind == "B":
        return value if isinstance(value, bytes) else base64.b64decode(value)
    if kind == "BS":
        return [v if isinstance(v, bytes) else base64.b64decode(v) for v in value]
    raise ValueError(f"unknown DynamoDB attribute type {kind}")


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: from_attribute(v) for k, v in item.items()}


def to_item(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: to_attribute(v) for k, v in data.items()}


def approximate_size(data: Mapping[str, Any]) -> int:
    """Close to DynamoDB's own item size (names + values), for a clear error before writing."""
    return sum(len(k.encode()) + len(json.dumps(v, default=str).encode()) for k, v in data.items())


class Expression:
    """Builds an update/condition expression with placeholders for every name and value."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}
        self._name_ids: dict[str, str] = {}

    def name(self, attribute: str) -> str:
        placeholder = self._name_ids.get(attribute)
        if placeholder is None:
            placeholder = f"#n{len(self._name_ids)}"
            self._name_ids[attribute] = placeholder
            self.names[placeholder] = attribute
        return placeholder

    def path(self, *attributes: str) -> str:
        return ".".join(self.name(a) for a in attributes)

    def value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = to_attribute(value)
        return placeholder

    def attribute(self, attribute: Mapping[str, Any]) -> str:
        """A value given in DynamoDB's own form, e.g. ``{"SS": [...]}``."""
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = dict(attribute)
        return placeholder

    def update(self, operations: Sequence[PatchOperation]) -> str:
        sets: list[str] = []
        removes: list[str] = []
        for operation in squash(operations):
            if operation.op == "set":
                sets.append(f"{self.name(operation.key)} = {self.value(operation.value)}")
            else:
                removes.append(self.name(operation.key))
        clauses = []
        if sets:
            clauses.append("SET " + ", ".join(sets))
        if removes:
            clauses.append("REMOVE " + ", ".join(removes))
        return " ".join(clauses)

    def arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {}
        if self.names:
            arguments["ExpressionAttributeNames"] = self.names
        if self.values:
            arguments["ExpressionAttributeValues"] = self.values
        return arguments
