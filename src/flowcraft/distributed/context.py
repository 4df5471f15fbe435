"""Stored run contexts for distributed workers: one item per run, written conditionally.

A :class:`DistributedContext` is an :class:`~flowcraft.context.AsyncContext`
bound to one run, plus the four conditional operations the job algorithm is
built on. Each is **one** service call, and each returns the context as it
is after the call, so a worker never needs a separate read (a claim or commit
given ``base`` may answer with that copy plus its write instead, when the
caller says what others wrote cannot matter):

``create(initial)``
    Store a new run's context; refuse (:class:`~flowcraft.errors.RunAlreadyExistsError`)
    when the run id is taken, leaving the existing item untouched.
``claim(node, iteration, owner, lease, base=None)``
    Take the node's lease ``_flowcraft.lock.<node>`` if the node has not
    completed that iteration and nobody else holds a live lease, and count
    the attempt in ``_flowcraft.attempts.<node>`` in the same write (poison
    jobs are recognised by attempts started, not by queue receives). Returns
    ``CLAIMED`` / ``DONE`` / ``LOCKED`` / ``MISSING`` with the context. With
    ``base`` (a copy of the run this worker kept that already holds everything
    the node depends on: :mod:`.snapshots`), a backend may answer a claim
    that succeeds with ``base`` plus the lease and attempt count instead of
    reading the run back, if the stored run has not ended and the node is
    neither awaiting nor running a map (:func:`between_claim_and_record`).
    With ``create``, an item that does not exist yet is claimed as an empty one (a
    branch item's first claim: :mod:`.homes`) instead of answering ``MISSING``.
``commit(node, iteration, owner, operations, claims, base=None)``
    If we still own the lease: apply the node's output, context writes and
    routing record, drop our lease and attempt count, take leases for
    ``claims`` (successors this worker continues with). Else nothing.
    With ``base`` (the caller's copy of the run as its claim returned it), a
    backend may skip reading the whole run back: if the run has not ended, it
    answers with ``base`` plus this write (:func:`commit_answer`). The caller
    passes it only when nothing another writer did can change what follows
    the commit (a chain's next node, claimed in the same write). ``counts``
    adds to number keys (absent ones count as 0) in the same write: a counted
    join's arrivals (:func:`arrivals_key`); the answer holds their new values.
``renew(node, owner, lease)``
    Push the lease's expiry out while a long node runs.
``release(node, owner, attempts=None)``
    Drop our lease; with ``attempts``, also leave the node's attempt count at
    that number (the claim's count minus one when the job only waited or was
    refused: it did not run the node). Nobody else claims the node while we
    hold its lease, so the count cannot have changed since our claim.
``apply(operations)``
    Unconditional patch (skip records, awaiting markers, resume).

Because every commit of a run lands on the same item and returns it, the
last of a join's predecessors to commit is the one that sees all of them:
that worker, and only that one, starts the join. No second store, no double
count under redelivery. A commit that need not read the run back (``base``)
still decides its joins: it counts its arrival at each ``all`` join it
leads to (``counts``, exactly once, as the commit is), and the one whose
count completes a counted join reads the run and decides from the records.

Backends implement the conditions natively (DynamoDB condition expressions,
Cosmos DB conditional patch / ``_etag``); :func:`claim_status` states them
once in Python, for the in-memory backend and for reading a failed write.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..context import (
    INTERNAL_PREFIX,
    AsyncContext,
    AsyncContextBase,
    PatchOperation,
    apply_patch,
)
from ..core.routing import AWAITING_IDS_KEY, RECORD_PREFIX
from ..errors import RunAlreadyExistsError
from ..nodes.base import CancellationSignal

logger = logging.getLogger("flowcraft.distributed")

LOCK_PREFIX = f"{INTERNAL_PREFIX}lock."
ATTEMPTS_PREFIX = f"{INTERNAL_PREFIX}attempts."
"""How often the node's current iteration was claimed without finishing (reset by its commit)."""
BLUEPRINT_KEY = f"{INTERNAL_PREFIX}blueprintId"
"""The run's blueprint, so a job naming another one is refused (written at start, or adopted
from the first job committed for runs started by clients that do not write it)."""
RUN_STATE_KEY = f"{INTERNAL_PREFIX}run"
"""``{"status": "failed", "reason": ...}`` once a run failed: later jobs of it are dropped."""
VERSION_KEY = "blueprintVersion"


def id_digest(node_id: str) -> str:
    """A node id as it appears in the derived ids of items stored beside a run (ids of
    stored items may not hold every character a node id can)."""
    return hashlib.sha256(node_id.encode()).hexdigest()[:16]


def lock_key(node_id: str) -> str:
    return LOCK_PREFIX + node_id


def attempts_key(node_id: str) -> str:
    return ATTEMPTS_PREFIX + node_id


def attempts(data: Mapping[str, Any], node_id: str) -> int:
    value = data.get(attempts_key(node_id))
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def run_exists_error(run_id: str) -> RunAlreadyExistsError:
    return RunAlreadyExistsError(
        f"a run with id '{run_id}' already exists; it was left untouched (choose another "
        "run id, or omit it to get a fresh one)", run_id=run_id)


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"
    DONE = "done"
    """The node already completed this iteration (a redelivered job)."""
    LOCKED = "locked"
    """Another worker holds a live lease on the node."""
    MISSING = "missing"
    """No context is stored for the run."""


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    data: dict[str, Any] | None
    holder: str | None = None
    expires: float | None = None


def claim_status(
    data: Mapping[str, Any] | None, node_id: str, iteration: int, owner: str, now: float
) -> ClaimStatus:
    """The claim rule: not yet completed at ``iteration``, and no live lease of someone else."""
    if data is None:
        return ClaimStatus.MISSING
    record = data.get(RECORD_PREFIX + node_id)
    count = int(record.get("n", 1)) if isinstance(record, Mapping) else 0
    if count > iteration:
        return ClaimStatus.DONE
    lease = data.get(LOCK_PREFIX + node_id)
    if isinstance(lease, Mapping) and lease.get("owner") != owner and float(
        lease.get("expires", 0)
    ) > now:
        return ClaimStatus.LOCKED
    return ClaimStatus.CLAIMED


def owns_lease(data: Mapping[str, Any], node_id: str, owner: str) -> bool:
    lease = data.get(LOCK_PREFIX + node_id)
    return isinstance(lease, Mapping) and lease.get("owner") == owner


def lease_value(owner: str, iteration: int, lease_seconds: float, now: float) -> dict[str, Any]:
    return {"owner": owner, "n": iteration, "expires": round(now + lease_seconds, 3)}


def live_lease(data: Mapping[str, Any], node_id: str, now: float) -> bool:
    lease = data.get(LOCK_PREFIX + node_id)
    return isinstance(lease, Mapping) and float(lease.get("expires", 0)) > now


class DistributedContext(AsyncContext, Protocol):
    """A run's stored context: an :class:`~flowcraft.context.AsyncContext` plus the
    operations of the module docstring. Implementations derive from
    :class:`~flowcraft.context.AsyncContextBase`, which writes the ``AsyncContext`` methods
    over ``load()`` and ``apply()``."""

    run_id: str

    async def load(self) -> dict[str, Any] | None: ...
    async def create(self, initial: Mapping[str, Any]) -> None: ...
    async def claim(self, node_id: str, iteration: int, owner: str,
                    lease_seconds: float, *, count_attempt: bool = True,
                    base: Mapping[str, Any] | None = None, create: bool = False) -> Claim: ...
    async def commit(self, node_id: str, iteration: int, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Iterable[tuple[str, int]] = (),
                     lease_seconds: float = 60.0, *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None: ...
    async def renew(self, node_id: str, owner: str, lease_seconds: float) -> bool: ...
    async def release(self, node_id: str, owner: str, *,
                      attempts: int | None = None) -> None: ...
    async def apply(self, operations: Sequence[PatchOperation]) -> dict[str, Any] | None: ...


def owner_token(owner: str) -> str:
    """The random part of a lease owner: unique per execution, and short in every record."""
    return owner.rsplit("/", 1)[-1]


async def keep_lease(context: DistributedContext, node_id: str, owner: str,
                     lease_seconds: float, cancelled: CancellationSignal | None = None) -> None:
    """Renew ``owner``'s lease on the node three times per lease until it is no longer held
    (committed, or taken over); with ``cancelled``, also watch the run: set it when the run
    is cancelled (one read per renewal), so the node sees ``ctx.signal``."""
    while True:
        await asyncio.sleep(max(0.05, lease_seconds / 3))
        try:
            # Renew first: a slow read must never delay the lease past its expiry.
            if not await context.renew(node_id, owner, lease_seconds):
                # Committed meanwhile (the commit removes the lease), or taken over: the
                # commit, conditioned on the lease, tells which and logs a takeover.
                logger.debug("run %s node %s: lease no longer held", context.run_id, node_id)
                return
            if cancelled is not None and not cancelled.is_set():
                run_state = await context.get(RUN_STATE_KEY)  # the run's item alone
                if isinstance(run_state, Mapping) and run_state.get("status") == "cancelled":
                    logger.info("run %s node %s: run cancelled; signalling the node",
                                context.run_id, node_id)
                    cancelled.set()
        except Exception as exc:
            logger.warning("run %s node %s: lease renewal failed: %s", context.run_id,
                           node_id, exc)


def release_operations(node_id: str, attempts: int | None) -> list[PatchOperation]:
    """The write of a release: the lease goes; the attempt count is left at ``attempts``
    (removed at zero, so a refused job leaves nothing behind)."""
    operations = [PatchOperation("delete", lock_key(node_id))]
    if attempts is not None:
        operations.append(PatchOperation("set", attempts_key(node_id), attempts) if attempts > 0
                          else PatchOperation("delete", attempts_key(node_id)))
    return operations


def commit_operations(
    node_id: str,
    operations: Sequence[PatchOperation],
    claims: Iterable[tuple[str, int]],
    owner: str,
    lease_seconds: float,
    now: float,
) -> list[PatchOperation]:
    """The full write of a commit, in the order a backend applies it."""
    full = [PatchOperation("delete", attempts_key(node_id)), *operations]
    full.append(PatchOperation("delete", lock_key(node_id)))
    full.extend(
        PatchOperation("set", lock_key(claimed), lease_value(owner, iteration, lease_seconds, now))
        for claimed, iteration in claims
    )
    return full


def commit_answer(base: Mapping[str, Any], written: Sequence[PatchOperation],
                  counted: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a commit given ``base`` answers when it did not read the run back: ``base`` with
    the commit's write (:func:`commit_operations`) applied and the counts' new values
    (``counted``), as a new dict."""
    answer = dict(base)
    apply_patch(answer, written)
    answer.update(counted or {})
    return answer


MAP_PREFIX = f"{INTERNAL_PREFIX}map."
"""``_flowcraft.map.<nodeId>``: the marker of a scatter whose map ledger is running."""


def map_key(node_id: str) -> str:
    return MAP_PREFIX + node_id


def between_claim_and_record(data: Mapping[str, Any], node_id: str) -> bool:
    """Whether the stored run shows ``node_id`` in a state it reaches without a record: parked
    (awaiting a resume) or running a map ledger. A copy of the run made before may not show
    it, so a claim is answered from a copy (``base``) only when this is false."""
    return map_key(node_id) in data or node_id in (data.get(AWAITING_IDS_KEY) or ())


ARRIVALS_PREFIX = f"{INTERNAL_PREFIX}arrivals."


def arrivals_key(node_id: str) -> str:
    """How many of a join's predecessors have committed (see
    :attr:`~flowcraft.core.graph.Graph.counted_joins`); every completion commit adds to it
    for each join it leads to."""
    return ARRIVALS_PREFIX + node_id


class InMemoryRunStore:
    """Contexts of many runs in one process (the in-process backend's database).

    ``calls`` counts operations by name, so tests can assert a ceiling on
    store round trips per node.
    """

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.lock = asyncio.Lock()
        self.calls: dict[str, int] = {}

    def context(self, run_id: str) -> InMemoryDistributedContext:
        return InMemoryDistributedContext(self, run_id)

    def count(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1


class InMemoryDistributedContext(AsyncContextBase):
    """A :class:`DistributedContext` over an :class:`InMemoryRunStore`."""

    def __init__(self, store: InMemoryRunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def _item(self) -> dict[str, Any] | None:
        return self.store.items.get(self.run_id)

    def _snapshot(self) -> dict[str, Any] | None:
        item = self._item()
        return copy.deepcopy(item) if item is not None else None

    async def load(self) -> dict[str, Any] | None:
        self.store.count("load")
        return self._snapshot()

    async def create(self, initial: Mapping[str, Any]) -> None:
        self.store.count("create")
        async with self.store.lock:
            if self.run_id in self.store.items:
                raise run_exists_error(self.run_id)
            self.store.items[self.run_id] = copy.deepcopy(dict(initial))

    async def claim(self, node_id: str, iteration: int, owner: str,
                    lease_seconds: float, *, count_attempt: bool = True,
                    base: Mapping[str, Any] | None = None, create: bool = False) -> Claim:
        self.store.count("claim")
        async with self.store.lock:
            if create:
                self.store.items.setdefault(self.run_id, {})
            item = self._item()
            now = time.time()
            status = claim_status(item, node_id, iteration, owner, now)
            if status is ClaimStatus.CLAIMED:
                assert item is not None
                item[lock_key(node_id)] = lease_value(owner, iteration, lease_seconds, now)
                if count_attempt:
                    item[attempts_key(node_id)] = attempts(item, node_id) + 1
                if (base is not None and RUN_STATE_KEY not in item  # as the AWS backend
                        and not between_claim_and_record(item, node_id)):
                    answer = {**base, lock_key(node_id): dict(item[lock_key(node_id)])}
                    if attempts_key(node_id) in item:
                        answer[attempts_key(node_id)] = item[attempts_key(node_id)]
                    return Claim(status, answer, owner)
            lease = (item or {}).get(lock_key(node_id)) or {}
            return Claim(status, self._snapshot(), lease.get("owner"), lease.get("expires"))

    async def claim_together(self, claims: Sequence[tuple[str, int, str]],
                             lease_seconds: float) -> list[dict[str, Any]] | None:
        """As the AWS backend's: several claims from copies in one write, all or none."""
        self.store.count("claim")
        async with self.store.lock:
            item = self._item()
            now = time.time()
            if item is None or RUN_STATE_KEY in item or any(
                    claim_status(item, node_id, iteration, owner, now) is not ClaimStatus.CLAIMED
                    or between_claim_and_record(item, node_id)
                    for node_id, iteration, owner in claims):
                return None
            written = []
            for node_id, iteration, owner in claims:
                item[lock_key(node_id)] = lease_value(owner, iteration, lease_seconds, now)
                item[attempts_key(node_id)] = attempts(item, node_id) + 1
                written.append({lock_key(node_id): dict(item[lock_key(node_id)]),
                                attempts_key(node_id): item[attempts_key(node_id)]})
            return written

    async def commit(self, node_id: str, iteration: int, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Iterable[tuple[str, int]] = (),
                     lease_seconds: float = 60.0, *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        self.store.count("commit")
        async with self.store.lock:
            item = self._item()
            if item is None or not owns_lease(item, node_id, owner):
                return None
            written = commit_operations(node_id, operations, claims, owner, lease_seconds,
                                        time.time())
            lean = base is not None and RUN_STATE_KEY not in item
            apply_patch(item, copy.deepcopy(written))
            for key, amount in (counts or {}).items():
                current = item.get(key)
                item[key] = (current if isinstance(current, int) else 0) + amount
            if lean:
                assert base is not None  # answered as the AWS backend answers
                return commit_answer(base, written, {key: item[key] for key in counts or ()})
            return self._snapshot()

    async def renew(self, node_id: str, owner: str, lease_seconds: float) -> bool:
        self.store.count("renew")
        async with self.store.lock:
            item = self._item()
            if item is None or not owns_lease(item, node_id, owner):
                return False
            item[lock_key(node_id)]["expires"] = round(time.time() + lease_seconds, 3)
            return True

    async def release(self, node_id: str, owner: str, *, attempts: int | None = None) -> None:
        self.store.count("release")
        async with self.store.lock:
            item = self._item()
            if item is not None and owns_lease(item, node_id, owner):
                apply_patch(item, release_operations(node_id, attempts))

    async def apply(self, operations: Sequence[PatchOperation]) -> dict[str, Any] | None:
        self.store.count("apply")
        async with self.store.lock:
            item = self._item()
            if item is None:
                return None
            apply_patch(item, copy.deepcopy(list(operations)))
            return self._snapshot()
