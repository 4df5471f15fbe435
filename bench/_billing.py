"""What ``bench/scale.py`` reads from the moto server in its process: DynamoDB write bytes
(:class:`WriteMeter`) and the executed nodes of a case that timed out (:func:`count_items`).

DynamoDB bills a write by the size of the item: for PutItem, UpdateItem and DeleteItem
(also as parts of TransactWriteItems and BatchWriteItem) the larger of the item before
and after the write. :class:`WriteMeter` wraps moto's DynamoDB backend
(``DynamoDBBackend.put_item``/``update_item``/``delete_item``; moto's own
``transact_write_items`` and ``BatchWriteItem`` handler call these for each of their
parts, so each part is seen once) and, for every write, measures the stored item before
and after it with :func:`item_size`. A single-item write whose condition fails is billed
as DynamoDB bills it: the size of the existing item. The request that caused a write is
known from a wrapper of ``DynamoHandler.call_action`` (the handler of one HTTP request,
on the server thread that runs the write): its ``X-Amz-Target`` operation and the
``app/...`` id in its User-Agent.

:func:`item_size` follows DynamoDB's published rules over moto's stored item (DynamoDB
JSON): attribute name bytes (UTF-8) + value bytes, where a string is its UTF-8 bytes, a
binary its raw bytes, a number 1 byte plus 1 per two significant digits, a boolean or
null 1 byte, a list or map 3 bytes plus 1 byte and the size (for a map also the name) of
each element, and a set the sum of its elements. It is the billing size, not the stored
JSON's length.
"""

from __future__ import annotations

import base64
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any


def number_size(text: str) -> int:
    digits = "".join(c for c in str(text).lower().split("e")[0] if c.isdigit())
    significant = digits.strip("0") or "0"
    return 1 + (len(significant) + 1) // 2


def value_size(value: Any) -> int:
    """The billing size of one DynamoDB value: a moto ``DynamoType`` or a DynamoDB-JSON
    ``{"S": ...}`` mapping."""
    kind, raw = _typed(value)
    if kind == "S":
        return len(str(raw).encode("utf-8"))
    if kind == "N":
        return number_size(raw)
    if kind == "B":
        return _binary_size(raw)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(str(v).encode("utf-8")) for v in raw)
    if kind == "NS":
        return sum(number_size(v) for v in raw)
    if kind == "BS":
        return sum(_binary_size(v) for v in raw)
    if kind == "L":
        return 3 + sum(1 + value_size(v) for v in raw)
    if kind == "M":
        return 3 + sum(len(str(k).encode("utf-8")) + 1 + value_size(v) for k, v in raw.items())
    return len(str(raw).encode("utf-8"))


def _typed(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict):
        (kind, raw), = value.items()
        return str(kind), raw
    return str(value.type), value.value


def _binary_size(raw: Any) -> int:
    if isinstance(raw, bytes | bytearray):
        return len(raw)
    try:
        return len(base64.b64decode(str(raw), validate=True))
    except ValueError:
        return len(str(raw).encode("utf-8"))


def item_size(item: Any) -> int:
    """The billing size of a moto ``Item`` (``None``: no item, 0)."""
    if item is None:
        return 0
    attrs = item.attrs if hasattr(item, "attrs") else item
    return sum(len(str(name).encode("utf-8")) + value_size(value) for name, value in attrs.items())


class WriteMeter:
    """Bytes billed by DynamoDB writes, by (who, operation); see the module docstring."""

    def __init__(self, classify_agent: Callable[[str], str]) -> None:
        self.classify_agent = classify_agent
        self.lock = threading.Lock()
        self.local = threading.local()
        self.bytes: Counter[str] = Counter()  # "who op" -> bytes
        self.writes: Counter[str] = Counter()  # "who op" -> writes
        self.largest = 0  # the largest item size seen by a write (before or after it)
        self._undo: list[Callable[[], None]] = []

    def reset(self) -> None:
        with self.lock:
            self.bytes = Counter()
            self.writes = Counter()
            self.largest = 0

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self.lock:
            return Counter(self.bytes), Counter(self.writes)

    def _record(self, part: str, size: int) -> None:
        who = getattr(self.local, "who", "other")
        operation = getattr(self.local, "operation", "?")
        label = f"{who} {operation}" + (f".{part}" if operation in (
            "TransactWriteItems", "BatchWriteItem") else "")
        with self.lock:
            self.bytes[label] += size
            self.writes[label] += 1
            self.largest = max(self.largest, size)

    def install(self) -> None:
        from moto.dynamodb.exceptions import ConditionalCheckFailed
        from moto.dynamodb.models import DynamoDBBackend
        from moto.dynamodb.responses import DynamoHandler

        meter = self
        originals = {name: getattr(DynamoDBBackend, name)
                     for name in ("put_item", "update_item", "delete_item")}
        call_action = DynamoHandler.call_action

        def handler(self: Any) -> Any:
            headers = {str(k).lower(): str(v) for k, v in (self.headers or {}).items()}
            meter.local.who = meter.classify_agent(headers.get("user-agent", ""))
            meter.local.operation = headers.get("x-amz-target", "").partition(".")[2] or "?"
            try:
                return call_action(self)
            finally:
                meter.local.who = meter.local.operation = None

        def old_item(backend: Any, table_name: str, key: dict[str, Any]) -> Any:
            try:
                return backend.get_item(table_name, key)
            except Exception:
                return None

        def measured(name: str, part: str, key_of: Callable[[Any, str, Any], dict[str, Any]],
                     ) -> Callable[..., Any]:
            original = originals[name]

            def write(backend: Any, table_name: str, first: Any, *args: Any,
                      **kwargs: Any) -> Any:
                try:
                    before = item_size(old_item(backend, table_name,
                                                key_of(backend, table_name, first)))
                except Exception:
                    before = 0
                try:
                    result = original(backend, table_name, first, *args, **kwargs)
                except ConditionalCheckFailed:
                    meter._record(part + "(failed)", before)
                    raise
                after = 0 if name == "delete_item" else item_size(result)
                meter._record(part, max(before, after))
                return result

            return write

        def key_of_item(backend: Any, table_name: str, attrs: Any) -> dict[str, Any]:
            table = backend.get_table(table_name)
            key = {table.hash_key_attr: attrs[table.hash_key_attr]}
            if table.range_key_attr is not None:
                key[table.range_key_attr] = attrs[table.range_key_attr]
            return key

        def key_given(backend: Any, table_name: str, key: Any) -> dict[str, Any]:
            return dict(key)

        DynamoDBBackend.put_item = measured("put_item", "Put", key_of_item)  # type: ignore[method-assign]
        DynamoDBBackend.update_item = measured("update_item", "Update", key_given)  # type: ignore[method-assign]
        DynamoDBBackend.delete_item = measured("delete_item", "Delete", key_given)  # type: ignore[method-assign]
        DynamoHandler.call_action = handler  # type: ignore[method-assign]

        def undo() -> None:
            for name, original in originals.items():
                setattr(DynamoDBBackend, name, original)
            DynamoHandler.call_action = call_action  # type: ignore[method-assign]

        self._undo.append(undo)

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


# -- moto's request recorder ----------------------------------------------------------------


# -- executed nodes of a timed-out case, from moto's tables ---------------------------------


def count_items(table_name: str, count: Any) -> int:
    """Sum ``count(item)`` over the items of a moto table (in this process)."""
    from moto.dynamodb.models import dynamodb_backends

    total = 0
    for account in list(dynamodb_backends.keys()):
        for region in list(dynamodb_backends[account].keys()):
            table = dynamodb_backends[account][region].tables.get(table_name)
            if table is not None:
                total += sum(count(item) for item in list(table.all_items()))
    return total


def flowcraft_outputs(item: Any) -> int:
    return sum(1 for name in item.attrs if str(name).startswith("_outputs."))


def celery_success(item: Any) -> int:
    """1 for a stored Celery task result whose state is SUCCESS. (Celery's DynamoDB backend
    keys an item by ``str()`` of the key's bytes: ``b'celery-task-meta-<id>'``.)"""
    key = str(getattr(item.attrs.get("id"), "value", ""))
    raw = getattr(item.attrs.get("result"), "value", b"")
    text = raw if isinstance(raw, bytes) else str(raw).encode()
    if "celery-task-meta-" not in key:
        return 0
    try:
        text = base64.b64decode(text, validate=True)
    except ValueError:
        pass
    return 1 if b'"SUCCESS"' in text else 0
