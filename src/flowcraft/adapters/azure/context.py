"""``CosmosDbContext``: a run's context as one Cosmos DB item.

The item is ``{"id": runId, "runId": runId, <key>: <value>, ...}``, the context keys at the
top level as the TypeScript library writes them, in a container partitioned on ``/runId``.
A key that would collide with a property of the item itself (``id``, ``runId``, Cosmos DB's
``_rid``/``_self``/``_etag``/``_attachments``/``_ts``, ``ttl``, ``context``) or that starts
with ``~`` is stored as ``~`` + the key and read back as the key: nothing is dropped.
Writes are partial updates (patch) of exactly the keys that changed,
conditioned with a filter predicate where the protocol of
:mod:`flowcraft.distributed.context` needs a condition; Cosmos DB returns the
patched item, so a claim or commit is one request. Parallel branches
therefore never overwrite each other's keys (no read-modify-write).

``create`` is ``create_item``: a run id that is taken answers 409 and is refused
(the existing run is left as it is). The claim counts the attempt with a patch
``incr`` in the same request.

A patch takes at most 10 operations, and cannot remove a property that is
absent; such writes fall back to optimistic concurrency on ``_etag`` (read,
apply, replace if unchanged, retry), which is just as safe.

Runs stored by earlier versions keep their keys in a ``context`` object (the nested
layout). They are read as they are and moved to the top level by their first write: every
patch is conditioned on the item having no ``context`` object, and a patch refused that way
goes through the ``_etag`` path, whose replace writes the top-level layout. A context that
has seen its item in the top-level layout drops that condition (nothing writes the nested
layout any more).

Items created by the TypeScript library's client have ``id`` but no ``runId``, and the
initial context as top-level properties: they are adopted on first use (copied into the
run's partition with ``runId`` set, the original removed). Throttling (429) is retried.

With a payload store (``payloads``, a
:class:`~flowcraft.adapters.azure.payloads.BlobPayloadStore`), values larger than its
threshold are kept in Blob Storage and the item holds references to them; every context
this class returns has them resolved (:mod:`flowcraft.adapters.claimcheck`). The item
limit then counts the references, not the values. Without one, the item holds every value.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ...context import AsyncContextBase, PatchOperation, apply_patch, squash
from ...core.routing import RECORD_PREFIX
from ...distributed.context import (
    Claim,
    ClaimStatus,
    attempts_key,
    claim_status,
    commit_operations,
    lease_value,
    lock_key,
    owns_lease,
    release_operations,
    run_exists_error,
)
from ...errors import ContextTooLargeError, FlowcraftError, RunAlreadyExistsError
from ..claimcheck import PayloadStore, offload, plan_values, resolve
from ._cosmos import (
    COLLIDING,
    ITEM_LIMIT_BYTES,
    ITEM_PROPERTIES,
    LEGACY_PROPERTY,
    MAX_PATCH_OPERATIONS,
    context_key,
    context_pointer,
    literal,
    prop,
    status_code,
    stored_name,
    with_throttling_retries,
)

TOP_LEVEL = f"NOT IS_DEFINED(c.{LEGACY_PROPERTY})"
"""The condition of every patch until the item is known to be in the top-level layout."""
LARGE_WRITE_BYTES = 64 * 1024
"""A write this large, by a context that has not seen its item yet, reads it first to check
the item limit (``_etag`` path)."""


class _ConditionFailed(Exception):
    pass


class CosmosDbContext(AsyncContextBase):
    """The stored context of one run (``AsyncContext`` plus the distributed operations)."""

    def __init__(self, run_id: str, *, client: Any, database_name: str,
                 container_name: str, payloads: PayloadStore | None = None) -> None:
        self.run_id = run_id
        self.client = client
        self.payloads = payloads
        """Where values too large for the item are kept (``None``: in the item)."""
        self.container = client.get_database_client(database_name).get_container_client(
            container_name)
        self._size: int | None = None
        """Bytes of the item as last seen: writes that may cross the item limit are checked
        before they are sent (not every server enforces the limit; the local one does not)."""
        self._top_level = False
        """The item has been seen in the top-level layout (it cannot go back to nested)."""
        self._refused: dict[str, Any] | None = None
        """The context read when the last conditional patch was refused, if it was read."""

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _is_nested(item: Mapping[str, Any]) -> bool:
        """Stored by an earlier version: the keys in a ``context`` object, and nothing else
        (a top-level item may have a ``context`` key of its own, written by another client)."""
        return ("runId" in item and isinstance(item.get(LEGACY_PROPERTY), dict)
                and all(k in ITEM_PROPERTIES or k == LEGACY_PROPERTY for k in item))

    def _data(self, item: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if item is None:
            return None
        if "runId" not in item:  # a client-created item: its keys as the client wrote them
            return {k: v for k, v in item.items() if k not in ITEM_PROPERTIES}
        if self._is_nested(item):
            return dict(item[LEGACY_PROPERTY])
        data = {k: v for k, v in item.items() if k in COLLIDING and k not in ITEM_PROPERTIES}
        # A colliding key as another client wrote it, unless ours (escaped) is there too.
        data.update((context_key(k), v) for k, v in item.items() if k not in COLLIDING)
        return data

    @staticmethod
    def _unescaped(item: Mapping[str, Any]) -> bool:
        """A top-level item with a colliding key written as it is, by another client."""
        return any(k in COLLIDING and k not in ITEM_PROPERTIES for k in item)

    def _item(self, data: Mapping[str, Any],
              current: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The item storing a context, in the top-level layout; a replacement of ``current``
        keeps its expiry (``ttl``)."""
        item = {"id": self.run_id, "runId": self.run_id,
                **{stored_name(k): v for k, v in data.items()}}
        if current is not None and "ttl" in current:
            item["ttl"] = current["ttl"]
        return item

    @staticmethod
    def _measure(item: Mapping[str, Any]) -> int:
        return len(json.dumps(item, separators=(",", ":"), ensure_ascii=False,
                              default=str).encode("utf-8"))

    def _remember(self, item: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if item is not None:
            item = dict(item)
            self._size = self._measure(item)
            if "runId" in item and not self._is_nested(item):
                self._top_level = True
        return item

    def _may_exceed(self, operations: Sequence[PatchOperation]) -> bool:
        growth = sum(self._measure({op.key: op.value}) for op in operations if op.op == "set")
        if self._size is None:  # not read yet: a large write is checked against the item
            return growth > LARGE_WRITE_BYTES
        return self._size + growth > ITEM_LIMIT_BYTES

    def _check_size(self, body: Mapping[str, Any]) -> None:
        size = self._measure(body)
        if size > ITEM_LIMIT_BYTES:
            raise ContextTooLargeError(self.run_id, size, ITEM_LIMIT_BYTES, "Cosmos DB")

    async def _read(self) -> dict[str, Any] | None:
        """The raw item (with ``_etag``), adopting a client-created item without ``runId``."""
        from azure.cosmos.exceptions import CosmosHttpResponseError

        for attempt in range(2):
            try:
                return self._remember(await with_throttling_retries(
                    lambda: self.container.read_item(self.run_id, partition_key=self.run_id),
                    what=f"reading run {self.run_id}"))
            except CosmosHttpResponseError as exc:
                # 404; or 500, which the local Cosmos server answers for an absent item
                # (the query below settles it either way).
                if status_code(exc) not in (404, 500):
                    raise
                adopted = self._remember(await self._adopt())
            if adopted is not None or attempt:
                return adopted
            # Where the server keys items by id, another worker's adoption removes the
            # orphan a moment before it creates the adopted item: look once more.
            await asyncio.sleep(0.05)
        return None

    async def _adopt(self) -> dict[str, Any] | None:
        """Move an item written without ``runId`` into the run's partition."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosHttpResponseError
        from azure.cosmos.partition_key import NonePartitionKeyValue

        query = "SELECT * FROM c WHERE c.id = @id"
        for _ in range(10):
            found = [item async for item in self.container.query_items(
                query, parameters=[{"name": "@id", "value": self.run_id}])]
            orphan = next((item for item in found if "runId" not in item), None)
            if orphan is None:
                return next((item for item in found if item.get("runId") == self.run_id),
                            None)
            adopted = self._item(self._data(orphan) or {}, orphan)
            try:
                created = await self.container.create_item(adopted)
            except CosmosHttpResponseError as exc:
                if status_code(exc) != 409:
                    raise
                try:
                    # Another worker adopted it first.
                    created = await self.container.read_item(self.run_id,
                                                             partition_key=self.run_id)
                except CosmosHttpResponseError as read_error:
                    if status_code(read_error) == 500:
                        continue  # gone meanwhile (how the local Cosmos server says 404)
                    if status_code(read_error) != 404:
                        raise
                    # The orphan itself holds the id: some servers (the local Cosmos server)
                    # key items by id across partitions. Remove exactly the version read,
                    # then create; if it changed or went meanwhile, look again.
                    try:
                        await self.container.delete_item(
                            self.run_id, partition_key=NonePartitionKeyValue,
                            etag=orphan["_etag"], match_condition=MatchConditions.IfNotModified)
                    except CosmosHttpResponseError as delete_error:
                        if status_code(delete_error) in (404, 412):
                            continue
                        raise
                    try:
                        created = await self.container.create_item(adopted)
                    except CosmosHttpResponseError as create_error:
                        if status_code(create_error) == 409:
                            continue
                        raise
                    return dict(created)
            try:
                # Only the version read: where a server keys items by id across partitions,
                # this id may by now name the adopted item itself.
                await self.container.delete_item(
                    self.run_id, partition_key=NonePartitionKeyValue, etag=orphan["_etag"],
                    match_condition=MatchConditions.IfNotModified)
            except CosmosHttpResponseError:
                pass  # already gone, or another worker removed it
            return dict(created)
        raise FlowcraftError(f"run {self.run_id}: could not move its context item into the "
                             "run's partition (too much contention)", run_id=self.run_id)

    def _predicate(self, alternatives: Sequence[str]) -> str | None:
        """A filter predicate from alternatives (each a condition without ``OR``), each also
        requiring the top-level layout while the item's layout is not known."""
        if self._top_level:
            return "FROM c WHERE " + " OR ".join(alternatives) if alternatives else None
        # Distributed over the alternatives instead of parenthesised: the local Cosmos
        # server's query parser takes exponential time over parentheses.
        return "FROM c WHERE " + " OR ".join(
            [f"{TOP_LEVEL} AND {a}" for a in alternatives] or [TOP_LEVEL])

    async def _patch(self, operations: Sequence[PatchOperation], *,
                     where: Sequence[str] = (),
                     check: Callable[[Mapping[str, Any]], bool] | None = None,
                     add_to: Mapping[str, int] | None = None,
                     ) -> dict[str, Any] | None:
        """One conditional partial update returning the item; ``None`` if the condition failed.

        ``where`` (Cosmos SQL alternatives, any of which will do) and ``check`` (Python) state
        the same condition: the first for the patch, the second for the ``_etag`` fallback.
        ``add_to`` adds to number keys (absent ones count as 0) in the same write.
        """
        from azure.cosmos.exceptions import CosmosHttpResponseError

        self._refused = None
        operations = squash(operations)
        increments = dict(add_to or {})
        if (len(operations) + len(increments) <= MAX_PATCH_OPERATIONS
                and not self._may_exceed(operations)):
            patch = [
                {"op": "set", "path": context_pointer(op.key), "value": op.value}
                if op.op == "set" else {"op": "remove", "path": context_pointer(op.key)}
                for op in operations
            ] + [{"op": "incr", "path": context_pointer(key), "value": amount}
                 for key, amount in increments.items()]
            arguments: dict[str, Any] = {"partition_key": self.run_id, "patch_operations": patch}
            predicate = self._predicate(where)
            if predicate:
                arguments["filter_predicate"] = predicate
            try:
                item = await with_throttling_retries(
                    lambda: self.container.patch_item(self.run_id, **arguments),
                    what=f"updating run {self.run_id}")
            except CosmosHttpResponseError as exc:
                code = status_code(exc)
                if code == 412:
                    if self._top_level:
                        return None
                    # The condition failed, or the layout condition did: a nested item
                    # takes the _etag path, which moves it to the top level; a top-level
                    # one (now known) is patched again on the condition alone.
                    current = await self._read()
                    if current is None or "runId" not in current:
                        return None
                    if self._is_nested(current):
                        return await self._replace(operations, check, increments)
                    self._refused = self._data(current)
                    if check is not None and (self._refused is None
                                              or not check(self._refused)):
                        return None
                    return await self._patch(operations, where=where, check=check,
                                             add_to=increments)
                if code == 413:
                    raise self._too_large(operations) from None
                if code not in (400, 404):
                    raise
                # 404: an item to adopt; 400: e.g. removing an absent property.
                return await self._replace(operations, check, increments)
            if "runId" not in item or self._is_nested(item) or self._unescaped(item):
                # A client-created item (a lenient server may have patched it in place):
                # move it into its partition; or one with a key to escape.
                return await self._normalize()
            return self._remember(dict(item))
        # Over 10 operations, or near the item limit: read, check, replace if unchanged.
        return await self._replace(operations, check, increments)

    async def _replace(self, operations: Sequence[PatchOperation],
                       check: Callable[[Mapping[str, Any]], bool] | None,
                       add_to: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosHttpResponseError

        for _ in range(20):
            item = await self._read()
            if item is None:
                return None
            data = self._data(item) or {}
            if check is not None and not check(data):
                return None
            apply_patch(data, operations)
            for key, amount in (add_to or {}).items():
                current = data.get(key)
                data[key] = (current if isinstance(current, int | float) else 0) + amount
            replacement = self._item(data, item)
            self._check_size(replacement)
            def replace(body: dict[str, Any] = replacement, etag: str = item["_etag"]) -> Any:
                return self.container.replace_item(
                    self.run_id, body, etag=etag, match_condition=MatchConditions.IfNotModified)

            try:
                replaced = await with_throttling_retries(replace,
                                                         what=f"replacing run {self.run_id}")
            except CosmosHttpResponseError as exc:
                if status_code(exc) == 412:
                    continue  # someone wrote in between: read again
                if status_code(exc) == 413:
                    raise self._too_large(operations) from None
                raise
            return self._remember(dict(replaced))
        raise FlowcraftError(f"run {self.run_id}: too much write contention on its context item",
                             run_id=self.run_id)

    async def _normalize(self) -> dict[str, Any] | None:
        """Rewrite an item in the top-level layout, in its partition (etag-guarded)."""
        return await self._replace([], None)

    def _too_large(self, operations: Sequence[PatchOperation]) -> ContextTooLargeError:
        size = sum(len(json.dumps(op.value, default=str)) for op in operations)
        return ContextTooLargeError(self.run_id, max(size, ITEM_LIMIT_BYTES + 1),
                                    ITEM_LIMIT_BYTES, "Cosmos DB")

    @staticmethod
    def _lease_held(node_id: str, owner: str) -> str:
        return f"{prop(lock_key(node_id))}.owner = {literal(owner)}"

    # -- distributed operations ------------------------------------------------------------

    async def _resolved(self, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """The context as callers get it: references replaced by their values."""
        return await resolve(self.payloads, self.run_id, data)

    async def load(self) -> dict[str, Any] | None:
        return await self._resolved(self._data(await self._read()))

    async def create(self, initial: Mapping[str, Any]) -> None:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        item, uploads = plan_values(self.payloads, self.run_id, initial)
        body = self._item(item)
        self._check_size(body)  # before anything is uploaded or written
        if self.payloads is not None:
            await self.payloads.upload(uploads)
        try:
            await with_throttling_retries(lambda: self.container.create_item(body),
                                          what=f"creating run {self.run_id}")
        except CosmosHttpResponseError as exc:
            if status_code(exc) == 409:
                raise run_exists_error(self.run_id) from None
            if status_code(exc) == 413:
                raise self._too_large([PatchOperation("set", k, v)
                                       for k, v in item.items()]) from None
            raise

    async def claim(self, node_id: str, iteration: int, owner: str,
                    lease_seconds: float, *, count_attempt: bool = True,
                    base: Mapping[str, Any] | None = None, create: bool = False) -> Claim:
        # ``base`` is not used: a Cosmos DB patch answers with the whole document anyway.
        now = time.time()
        if create:  # a branch item's first claim makes it, lease included: one request
            taken: dict[str, Any] = {
                lock_key(node_id): lease_value(owner, iteration, lease_seconds, now)}
            if count_attempt:
                taken[attempts_key(node_id)] = 1
            try:
                await self.create(taken)
            except RunAlreadyExistsError:
                pass  # made by an earlier claim: claimed as any item below
            else:
                return Claim(ClaimStatus.CLAIMED, taken, owner)
        record, lease = prop(RECORD_PREFIX + node_id), prop(lock_key(node_id))
        # (not done) AND (no lease of someone else), written out as an OR of ANDs (NOT
        # binds tighter than AND, AND than OR): the same condition without parentheses,
        # which the local Cosmos server's query parser takes exponential time over.
        not_done = (f"NOT IS_DEFINED({record})", f"{record}.n <= {iteration}")
        free = (f"NOT IS_DEFINED({lease})", f"{lease}.owner = {literal(owner)}",
                f"{lease}.expires < {now}")
        where = [f"{a} AND {b}" for a in not_done for b in free]

        def claimable(data: Mapping[str, Any]) -> bool:
            return claim_status(data, node_id, iteration, owner, now) is ClaimStatus.CLAIMED

        item = await self._patch(
            [PatchOperation("set", lock_key(node_id),
                            lease_value(owner, iteration, lease_seconds, now))],
            where=where, check=claimable,
            add_to={attempts_key(node_id): 1} if count_attempt else None,
        )
        if item is not None:
            return Claim(ClaimStatus.CLAIMED, await self._resolved(self._data(item)), owner)
        current = self._refused if self._refused is not None else self._data(await self._read())
        status = claim_status(current, node_id, iteration, owner, time.time())
        if status is ClaimStatus.CLAIMED:  # the lease expired in between
            return await self.claim(node_id, iteration, owner, lease_seconds,
                                    count_attempt=count_attempt)
        held = (current or {}).get(lock_key(node_id)) or {}
        return Claim(status, await self._resolved(current), held.get("owner"),
                     held.get("expires"))

    async def commit(self, node_id: str, iteration: int, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Iterable[tuple[str, int]] = (),
                     lease_seconds: float = 60.0, *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        # ``base`` is not used: a Cosmos DB patch answers with the whole document anyway.
        full = await offload(self.payloads, self.run_id, commit_operations(
            node_id, operations, claims, owner, lease_seconds, time.time()))
        item = await self._patch(full, where=[self._lease_held(node_id, owner)],
                                 check=lambda data: owns_lease(data, node_id, owner),
                                 add_to=counts)
        return await self._resolved(self._data(item))

    async def renew(self, node_id: str, owner: str, lease_seconds: float) -> bool:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        guarded = not self._top_level
        try:
            await self.container.patch_item(
                self.run_id, partition_key=self.run_id,
                patch_operations=[{"op": "set",
                                   "path": context_pointer(lock_key(node_id)) + "/expires",
                                   "value": round(time.time() + lease_seconds, 3)}],
                filter_predicate=self._predicate([self._lease_held(node_id, owner)]),
            )
        except CosmosHttpResponseError as exc:
            if status_code(exc) not in (404, 412):
                raise
            # A nested item holds no lease of ours (the claim that took it moved the item);
            # a top-level one that failed only the layout condition is renewed without it.
            if status_code(exc) == 404 or not guarded:
                return False
            await self._read()
            return await self.renew(node_id, owner, lease_seconds) if self._top_level else False
        return True

    async def release(self, node_id: str, owner: str, *, attempts: int | None = None) -> None:
        await self._patch(release_operations(node_id, attempts),
                          where=[self._lease_held(node_id, owner)],
                          check=lambda data: owns_lease(data, node_id, owner))

    async def apply(self, operations: Sequence[PatchOperation]) -> dict[str, Any] | None:
        operations = await offload(self.payloads, self.run_id, operations)
        return await self._resolved(self._data(await self._patch(operations)))
