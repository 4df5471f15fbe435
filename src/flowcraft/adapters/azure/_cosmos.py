"""Cosmos DB helpers: patch paths, predicate literals, system properties, throttling retries."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

logger = logging.getLogger("flowcraft.azure")

SYSTEM_PROPERTIES = frozenset({"_rid", "_self", "_etag", "_attachments", "_ts"})
MAX_PATCH_OPERATIONS = 10
"""Cosmos DB accepts at most 10 operations in one partial update."""
ITEM_LIMIT_BYTES = 2 * 1024 * 1024
THROTTLED = frozenset({429, 503})

T = TypeVar("T")


ITEM_PROPERTIES = frozenset({"id", "runId", "ttl"}) | SYSTEM_PROPERTIES
"""Properties of a context item that are not context keys (``ttl``: a finished run's expiry,
set by the adapter's retention)."""

LEGACY_PROPERTY = "context"
"""Items written before context keys moved to the top level hold them in this object."""

ESCAPE = "~"
"""Prefix of a context key stored under another name (see :func:`stored_name`)."""

COLLIDING = ITEM_PROPERTIES | {LEGACY_PROPERTY}
"""Context keys that cannot be item properties as they are: the item's identity, Cosmos DB's
own properties, ``ttl`` (per-item expiry) and the nested layout's object."""


def stored_name(key: str) -> str:
    """The item property holding a context key: the key itself, unless it collides with a
    property in :data:`COLLIDING` or starts with ``~``; then ``~`` + the key (reversible)."""
    return ESCAPE + key if key in COLLIDING or key.startswith(ESCAPE) else key


def context_key(name: str) -> str:
    """The context key an item property holds (the inverse of :func:`stored_name`)."""
    return name[len(ESCAPE):] if name.startswith(ESCAPE) else name


def pointer(key: str) -> str:
    """The JSON-pointer path of a top-level property (``~`` and ``/`` escaped)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def context_pointer(key: str) -> str:
    """The JSON-pointer path of the item property holding a context key."""
    return pointer(stored_name(key))


def literal(value: Any) -> str:
    """A Cosmos SQL literal (JSON syntax: strings double-quoted and escaped).

    In strings, every character that is not a lower-case ASCII letter, digit or plain
    punctuation - and every ``s`` - is written as a ``\\uXXXX`` escape, which Cosmos SQL
    reads as the character itself. That keeps the literal intact through a server that
    lower-cases the whole filter predicate (the local Cosmos server,
    ``@vercel/cosmosdb-server``, does: a node ``fetchUser`` would otherwise be looked up as
    ``fetchuser``), and clear of its sniffing for the word ``select``. Only what needs it is
    escaped: that server's query parser slows down with the length of the text.
    """
    if not isinstance(value, str):
        return json.dumps(value)
    escaped = []
    for char in value:
        if char in _PLAIN:
            escaped.append(char)
            continue
        code = ord(char)
        if code > 0xFFFF:  # a surrogate pair, as in JSON
            code -= 0x10000
            escaped.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            escaped.append(f"\\u{code:04x}")
    return '"' + "".join(escaped) + '"'


_PLAIN = frozenset("abcdefghijklmnopqrtuvwxyz0123456789_.:/-+ #@!?*()[]{},;=<>|&^%$~`'")
"""Characters a literal keeps as they are (``s`` is escaped: no literal can spell
``select``)."""


def prop(key: str) -> str:
    """``c["key"]``: a context key's property in Cosmos SQL, whatever characters it has."""
    return f"c[{literal(stored_name(key))}]"


def strip_system(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in SYSTEM_PROPERTIES}


def status_code(error: BaseException) -> int | None:
    code = getattr(error, "status_code", None)
    return int(code) if isinstance(code, int) else None


async def with_throttling_retries(call: Callable[[], Awaitable[T]], *, what: str,
                                  attempts: int = 8) -> T:
    """Retry a call that Cosmos DB or Storage answered with 429/503, with jittered backoff.

    The SDKs retry too; this outer loop keeps a throttled account from failing a node.
    """
    delay = 0.1
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except Exception as exc:
            if status_code(exc) not in THROTTLED or attempt == attempts:
                raise
            retry_after = _retry_after(exc)
            wait = retry_after if retry_after is not None else delay * (1 + random.random())
            logger.warning("%s throttled (%s); retrying in %.2fs", what, status_code(exc), wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _retry_after(error: BaseException) -> float | None:
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    for name in ("x-ms-retry-after-ms", "retry-after-ms"):
        if name in headers:
            try:
                return float(headers[name]) / 1000.0
            except ValueError:
                return None
    return None
