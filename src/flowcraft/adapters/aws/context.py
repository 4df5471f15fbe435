"""``DynamoDbContext``: a run's context as one DynamoDB item.

The item's key is ``runId``; every context key is an attribute of its own,
so a node's commit is one ``UpdateItem`` that sets and removes exactly the
attributes the node changed (parallel branches never overwrite each other).
Conditions and the returned item (``ReturnValues=ALL_NEW``) implement the
claim/commit protocol of :mod:`flowcraft.distributed.context`.

Runs started by the TypeScript library's client (as in the AWS guide) store the
initial context nested under a ``context`` attribute (``{runId, context:
{...}}``); its keys are presented to nodes as top-level keys, and the first
worker that claims a node of such a run moves them to top-level attributes
(so a node can also delete them). Items this module creates carry the marker
attribute ``_flowcraft.flat``, so a user key named ``context`` in a run
started from Python is never mistaken for the TypeScript client's layout.

A context key named ``runId`` (the item's key) is stored as the attribute ``~runId``, and
keys starting with ``~`` get one more ``~``: every context key round-trips.

DynamoDB items are limited to 400 KB. A write that would exceed it raises
:class:`~flowcraft.errors.ContextTooLargeError` naming the run and the size;
nothing is truncated. A value DynamoDB cannot hold (NaN, Decimal, an object)
raises :class:`~flowcraft.errors.UnstorableValueError` before anything is sent.

Routing records (``_flowcraft.node.<id>``) are stored as text: the node's resolution count
in ten digits and ``|``, then, for a committed node's record, its lease owner, commit time
and taken edges (``0000000001|3f9c2a1b|1795745779.49508|0,2``), and for any other record
its JSON without the count (``0000000002|{"skipped":true}``). A run's item holds one record
per node and each claim and commit returns the whole item: one string per record is less to
encode, decode and bill than a map of four fields (about 38 bytes against 45 for a
committed record). The claim's condition compares the text with the next count's ten
digits, which orders as the counts do. Records stored as maps (by earlier versions) are
read, and compared, as before.

``create`` is a put conditioned on ``attribute_not_exists(runId)``: a run id that
is taken is refused and the existing run left as it is. The claim counts the
attempt with ``if_not_exists(attempts, 0) + 1`` in the same ``UpdateItem``.

With a payload store (``payloads``, an
:class:`~flowcraft.adapters.aws.payloads.S3PayloadStore`), values larger than its
threshold are kept in S3 and the item holds references to them; every context this
class returns has them resolved (:mod:`flowcraft.adapters.claimcheck`). The item limit
then counts the references, not the values. Without one, the item holds every value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from ...context import AsyncContextBase, PatchOperation
from ...core.routing import AWAITING_IDS_KEY, RECORD_PREFIX
from ...distributed.context import (
    RUN_STATE_KEY,
    Claim,
    ClaimStatus,
    attempts_key,
    claim_status,
    commit_answer,
    commit_operations,
    lease_value,
    lock_key,
    map_key,
    release_operations,
    run_exists_error,
)
from ...errors import ContextTooLargeError, UnstorableValueError
from ..claimcheck import PayloadStore, offload, plan_values, resolve
from ._dynamo import ITEM_LIMIT_BYTES, Expression, approximate_size, from_item, to_item

KEY = "runId"
NESTED_CONTEXT = "context"
FLAT_MARKER = "_flowcraft.flat"
"""Set on items created by :meth:`DynamoDbContext.create`: attributes are context keys."""
ESCAPE = "~"


RECORD_DIGITS = 10
"""Digits of the resolution count that starts a record's text."""


_COMMON_FIELDS = frozenset({"n", "taken", "by", "t"})


def stored_value(key: str, value: Any) -> Any:
    """``value`` as the item holds it: a routing record as its text (module docstring)."""
    if not key.startswith(RECORD_PREFIX) or not isinstance(value, Mapping):
        return value
    count = f"{int(value.get('n', 1)):0{RECORD_DIGITS}d}|"
    by, taken, stamp = value.get("by"), value.get("taken"), value.get("t")
    if (value.keys() == _COMMON_FIELDS and isinstance(by, str) and "|" not in by
            and isinstance(stamp, float) and isinstance(taken, list)
            and all(type(index) is int for index in taken)):
        # A committed node's record, the common case: its fields in a fixed order.
        return f"{count}{by}|{stamp!r}|{','.join(map(str, taken))}"
    rest = {field: item for field, item in value.items() if field != "n"}
    return count + json.dumps(rest, separators=(",", ":"))


def loaded_value(key: str, value: Any) -> Any:
    """The inverse of :func:`stored_value`."""
    if (not key.startswith(RECORD_PREFIX) or not isinstance(value, str)
            or value[RECORD_DIGITS:RECORD_DIGITS + 1] != "|"):
        return value
    count, rest = int(value[:RECORD_DIGITS]), value[RECORD_DIGITS + 1:]
    if rest.startswith("{"):
        return {"n": count, **json.loads(rest)}
    by, stamp, taken = rest.split("|")
    return {"n": count, "taken": [int(i) for i in taken.split(",")] if taken else [],
            "by": by, "t": float(stamp)}


def attribute_name(key: str) -> str:
    """The attribute that holds context key ``key``: the key itself, except that ``runId``
    (the item's own key) and keys starting with ``~`` get a ``~`` in front, so a context
    key named ``runId`` is stored like any other instead of colliding with the item key."""
    return ESCAPE + key if key == KEY or key.startswith(ESCAPE) else key


def context_key(attribute: str) -> str:
    """The context key stored in ``attribute`` (the inverse of :func:`attribute_name`)."""
    return attribute[1:] if attribute.startswith(ESCAPE) else attribute


class DynamoDbContext(AsyncContextBase):
    """The stored context of one run (``AsyncContext`` plus the distributed operations)."""

    def __init__(self, run_id: str, *, client: Any, table_name: str,
                 payloads: PayloadStore | None = None) -> None:
        self.run_id = run_id
        self.client = client
        self.table_name = table_name
        self.payloads = payloads
        """Where values too large for the item are kept (``None``: in the item)."""

    # -- helpers ---------------------------------------------------------------------------

    def _key(self) -> dict[str, Any]:
        return {KEY: {"S": self.run_id}}

    @staticmethod
    def _is_client_item(item: Mapping[str, Any] | None) -> bool:
        """An item written by the TypeScript client: ``{runId, context: {...}}``, no marker."""
        return (item is not None and FLAT_MARKER not in item
                and "M" in (item.get(NESTED_CONTEXT) or {}))

    def _data(self, item: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if item is None:
            return None
        client_layout = self._is_client_item(item)
        raw = from_item(item)
        raw.pop(KEY, None)
        raw.pop(FLAT_MARKER, None)
        data = {(key := context_key(attribute)): loaded_value(key, value)
                for attribute, value in raw.items()}
        if client_layout:
            # The TypeScript client writes {runId, context: initialContext}.
            nested = data.pop(NESTED_CONTEXT)
            data = {**nested, **data}
        return data

    async def _flatten_client_item(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        """Move a TypeScript-client item's nested ``context`` to top-level attributes (keys already
        written at the top level win), once: of racing workers one does it."""
        nested = from_item(item)[NESTED_CONTEXT]
        expression = Expression()
        names = {k: expression.name(attribute_name(k)) for k in nested}
        sets = [f"{names[k]} = if_not_exists({names[k]}, {expression.value(v)})"
                for k, v in nested.items()]
        sets.append(f"{expression.name(FLAT_MARKER)} = {expression.value(True)}")
        marker, context = expression.name(FLAT_MARKER), expression.name(NESTED_CONTEXT)
        try:
            response = await self.client.update_item(
                TableName=self.table_name, Key=self._key(),
                UpdateExpression=f"SET {', '.join(sets)} REMOVE {context}",
                ConditionExpression=f"attribute_exists({context}) AND "
                                    f"attribute_not_exists({marker})",
                ReturnValues="ALL_NEW", **expression.arguments(),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return self._data(await self._get_item())  # flattened meanwhile by another worker
        return self._data(response.get("Attributes"))

    async def _update(self, operations: Sequence[PatchOperation], *, condition: str = "",
                      expression: Expression | None = None,
                      size_hint: Mapping[str, Any] | None = None,
                      add_to: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """One UpdateItem; ``None`` when the condition failed."""
        item = await self._update_item(operations, condition=condition, expression=expression,
                                       size_hint=size_hint, add_to=add_to)
        return None if item is None else self._data(item)

    async def _update_item(self, operations: Sequence[PatchOperation], *, condition: str = "",
                           expression: Expression | None = None,
                           size_hint: Mapping[str, Any] | None = None,
                           add_to: Mapping[str, int] | None = None,
                           returns: str = "ALL_NEW") -> dict[str, Any] | None:
        """One UpdateItem returning the raw new item (``returns="NONE"``: an empty dict);
        ``None`` when the condition failed. ``add_to`` adds to number attributes (absent ones
        count as 0) in the same write."""
        expression = expression or Expression()
        try:
            update = expression.update([
                PatchOperation(op.op, attribute_name(op.key), stored_value(op.key, op.value))
                for op in operations])
        except (TypeError, ValueError) as exc:
            raise UnstorableValueError(f"run {self.run_id}: DynamoDB cannot store a value of "
                                       f"this write: {exc}", run_id=self.run_id) from None
        if add_to:
            additions = ", ".join(
                f"{expression.name(k)} = if_not_exists({expression.name(k)}, "
                f"{expression.value(0)}) + {expression.value(n)}" for k, n in add_to.items())
            update = (update.replace("SET ", f"SET {additions}, ", 1) if "SET " in update
                      else f"SET {additions} {update}".strip())
        arguments: dict[str, Any] = {
            "TableName": self.table_name, "Key": self._key(), "UpdateExpression": update,
            "ReturnValues": returns,
        }
        if condition:
            arguments["ConditionExpression"] = condition
        arguments.update(expression.arguments())
        try:
            response = await self.client.update_item(**arguments)
        except self.client.exceptions.ConditionalCheckFailedException:
            return None
        except ClientError as exc:
            if _is_size_error(exc):
                current = self._data(await self._get_item()) or {}
                size = approximate_size({**current, **(size_hint or {})})
                raise ContextTooLargeError(self.run_id, max(size, ITEM_LIMIT_BYTES + 1),
                                           ITEM_LIMIT_BYTES, "DynamoDB") from None
            raise
        return dict(response.get("Attributes") or {})

    def check_size(self, data: Mapping[str, Any]) -> None:
        size = approximate_size(data)
        if size > ITEM_LIMIT_BYTES:
            raise ContextTooLargeError(self.run_id, size, ITEM_LIMIT_BYTES, "DynamoDB")

    # -- distributed operations ------------------------------------------------------------

    async def _get_item(self) -> dict[str, Any] | None:
        response = await self.client.get_item(TableName=self.table_name, Key=self._key(),
                                              ConsistentRead=True)
        item = response.get("Item")
        return None if item is None else dict(item)

    async def _resolved(self, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """The context as callers get it: references replaced by their values."""
        return await resolve(self.payloads, self.run_id, data)

    async def load(self) -> dict[str, Any] | None:
        return await self._resolved(self._data(await self._get_item()))

    async def resolved_item(self, item: Mapping[str, Any]) -> dict[str, Any] | None:
        """The context an item read elsewhere (a batched read) holds, as ``load`` answers."""
        return await self._resolved(self._data(item))

    async def create(self, initial: Mapping[str, Any]) -> None:
        stored, uploads = plan_values(self.payloads, self.run_id, initial)
        self.check_size(stored)  # before anything is uploaded or written
        if self.payloads is not None:
            await self.payloads.upload(uploads)
        item = to_item({attribute_name(k): stored_value(k, v) for k, v in stored.items()})
        item[KEY] = {"S": self.run_id}
        item[FLAT_MARKER] = {"BOOL": True}
        try:
            await self.client.put_item(TableName=self.table_name, Item=item,
                                       ConditionExpression="attribute_not_exists(#key)",
                                       ExpressionAttributeNames={"#key": KEY})
        except self.client.exceptions.ConditionalCheckFailedException:
            raise run_exists_error(self.run_id) from None
        except ClientError as exc:
            if _is_size_error(exc):
                raise ContextTooLargeError(self.run_id, approximate_size(stored),
                                           ITEM_LIMIT_BYTES, "DynamoDB") from None
            raise

    async def claim(self, node_id: str, iteration: int, owner: str,
                    lease_seconds: float, *, count_attempt: bool = True,
                    base: Mapping[str, Any] | None = None, create: bool = False) -> Claim:
        now = time.time()
        expression = Expression()
        exists = "" if create else f"attribute_exists({expression.name(KEY)}) AND "
        condition = exists + self._claim_condition(expression, node_id, iteration, owner, now,
                                                   copied=base is not None)
        item = await self._update_item(
            [PatchOperation("set", lock_key(node_id),
                            lease_value(owner, iteration, lease_seconds, now))],
            condition=condition, expression=expression,
            add_to={attempts_key(node_id): 1} if count_attempt else None,
            returns="ALL_NEW" if base is None else "UPDATED_NEW",
        )
        if item is not None and base is not None:
            return Claim(ClaimStatus.CLAIMED, {**base, **(self._data(item) or {})}, owner)
        if item is not None:
            data = (await self._flatten_client_item(item) if self._is_client_item(item)
                    else self._data(item))
            return Claim(ClaimStatus.CLAIMED, await self._resolved(data), owner)
        current = self._data(await self._get_item())  # why the condition failed
        status = claim_status(current, node_id, iteration, owner, time.time())
        if status is ClaimStatus.CLAIMED:
            # The lease expired in between, or only the conditions of a claim from a copy
            # failed (the run ended, the node is parked or mapping): once more, reading back.
            return await self.claim(node_id, iteration, owner, lease_seconds,
                                    count_attempt=count_attempt, create=create)
        lease_now = (current or {}).get(lock_key(node_id)) or {}
        return Claim(status, await self._resolved(current), lease_now.get("owner"),
                     lease_now.get("expires"))

    @staticmethod
    def _claim_condition(expression: Expression, node_id: str, iteration: int, owner: str,
                         now: float, *, copied: bool) -> str:
        """The condition of a claim of ``node_id``: not done at ``iteration`` and no live
        lease of someone else; ``copied`` (a claim answered from a copy): also the run not
        ended, and the node neither parked nor mapping (states it reaches with no record,
        which only the stored run can rule out)."""
        record, lease = expression.name(RECORD_PREFIX + node_id), expression.name(lock_key(node_id))
        condition = (
            f"(attribute_not_exists({record}) "
            f"OR (attribute_type({record}, {expression.value('S')}) "
            f"AND {record} < {expression.value(f'{iteration + 1:0{RECORD_DIGITS}d}')}) "
            f"OR (attribute_type({record}, {expression.value('M')}) "
            f"AND {record}.{expression.name('n')} <= {expression.value(iteration)})) "
            f"AND (attribute_not_exists({lease}) OR {lease}.{expression.name('owner')} = "
            f"{expression.value(owner)} OR {lease}.{expression.name('expires')} < "
            f"{expression.value(now)})"
        )
        if copied:
            awaiting = expression.name(attribute_name(AWAITING_IDS_KEY))
            condition += (
                f" AND attribute_not_exists({expression.name(attribute_name(RUN_STATE_KEY))})"
                f" AND attribute_not_exists({expression.name(attribute_name(map_key(node_id)))})"
                f" AND (attribute_not_exists({awaiting}) OR NOT contains({awaiting}, "
                f"{expression.value(node_id)}))")
        return condition

    async def claim_together(self, claims: Sequence[tuple[str, int, str]],
                             lease_seconds: float) -> list[dict[str, Any]] | None:
        """Claim several nodes from copies (``(node, iteration, owner)`` each) in one write
        that takes them all or none; for each, the lease and attempt count written (to lay
        over its copy). ``None``: one of them could not be claimed so (claim them one by
        one to learn which)."""
        now = time.time()
        expression = Expression()
        condition = " AND ".join(
            [f"attribute_exists({expression.name(KEY)})",
             *(f"({self._claim_condition(expression, node_id, iteration, owner, now, copied=True)})"
               for node_id, iteration, owner in claims)])
        item = await self._update_item(
            [PatchOperation("set", lock_key(node_id),
                            lease_value(owner, iteration, lease_seconds, now))
             for node_id, iteration, owner in claims],
            condition=condition, expression=expression,
            add_to={attempts_key(node_id): 1 for node_id, _, _ in claims},
            returns="UPDATED_NEW")
        if item is None:
            return None
        written = self._data(item) or {}
        return [{key: written[key] for key in (lock_key(node_id), attempts_key(node_id))
                 if key in written} for node_id, _, _ in claims]

    async def commit(self, node_id: str, iteration: int, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Iterable[tuple[str, int]] = (),
                     lease_seconds: float = 60.0, *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        written = commit_operations(node_id, operations, claims, owner, lease_seconds,
                                    time.time())
        full = await offload(self.payloads, self.run_id, written)
        size_hint = {op.key: op.value for op in full}
        if base is not None:
            # Only the counts come back (or nothing): the answer is base plus this write. The
            # run must not have ended; if it has (or the lease is gone), the full commit below
            # answers as usual (it holds the lease condition only).
            expression = Expression()
            condition = (f"{self._lease_condition(expression, node_id, owner)} AND "
                         f"attribute_not_exists({expression.name(attribute_name(RUN_STATE_KEY))})")
            updated = await self._update_item(
                full, condition=condition, expression=expression, size_hint=size_hint,
                add_to=counts, returns="UPDATED_NEW" if counts else "NONE")
            if updated is not None:
                counted = self._data(updated) or {}
                return commit_answer(base, written, {key: counted.get(key, 0)
                                                     for key in counts or ()})
        expression = Expression()
        return await self._resolved(await self._update(
            full, condition=self._lease_condition(expression, node_id, owner),
            expression=expression, size_hint=size_hint, add_to=counts))

    @staticmethod
    def _lease_condition(expression: Expression, node_id: str, owner: str) -> str:
        lease = expression.name(lock_key(node_id))
        return f"{lease}.{expression.name('owner')} = {expression.value(owner)}"

    async def renew(self, node_id: str, owner: str, lease_seconds: float) -> bool:
        expression = Expression()
        lease = expression.name(lock_key(node_id))
        condition = f"{lease}.{expression.name('owner')} = {expression.value(owner)}"
        arguments = {
            "TableName": self.table_name, "Key": self._key(),
            "UpdateExpression": f"SET {lease}.{expression.name('expires')} = "
                                f"{expression.value(round(time.time() + lease_seconds, 3))}",
            "ConditionExpression": condition,
        }
        arguments.update(expression.arguments())
        try:
            await self.client.update_item(**arguments)
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    async def release(self, node_id: str, owner: str, *, attempts: int | None = None) -> None:
        expression = Expression()
        lease = expression.name(lock_key(node_id))
        condition = f"{lease}.{expression.name('owner')} = {expression.value(owner)}"
        await self._update(release_operations(node_id, attempts), condition=condition,
                           expression=expression)

    async def apply(self, operations: Sequence[PatchOperation]) -> dict[str, Any] | None:
        if any(op.op == "delete" for op in operations):
            # A key of a TypeScript-client item may live in its nested context: flatten it first.
            item = await self._get_item()
            if item is not None and self._is_client_item(item):
                await self._flatten_client_item(item)
        operations = await offload(self.payloads, self.run_id, operations)
        expression = Expression()
        return await self._resolved(await self._update(
            operations, condition=f"attribute_exists({expression.name(KEY)})",
            expression=expression, size_hint={op.key: op.value for op in operations}))


def _is_size_error(exc: ClientError) -> bool:
    message = str(exc)
    return "Item size" in message and "exceeded" in message
