"""Branch items: the branches of a wide fan keep their state in items of their own.

A run's item holds one routing record per node, and every write of the item is billed
(and, on moto, copied) at its whole size: a fan of 1,000 branches made every branch's
claim and commit pay for 1,000 records. So the branches of a *wide fan*
(a :attr:`~flowcraft.core.graph.Graph.plain_fans` entry — plain branches from one source
into one counted join — with at least :data:`~flowcraft.core.graph.WIDE_FAN_MIN_BRANCHES`
branches) are stored apart: branch ``i`` of source ``S`` has the item
:func:`branch_run_id` ``(runId, S, i)`` in the same run store, holding that branch's
lease, attempt count, routing record, input and output — the keys :func:`owner_of` names.
Its claim, renewals, commit and release are the ordinary
:class:`~flowcraft.distributed.context.DistributedContext` operations on that item, as a
map ledger's chunks are: no backend has code of its own for it beyond ``claim(create=True)``
(the item is made by the branch's first claim) and an optional ``load_many``.

**Which runs.** The source's commit writes the marker ``_flowcraft.items.<S>``
(``{"n": branches, "join": J}``) into the run's item; a branch lives in its item only when
the run holds that marker. A worker therefore never decides by its own settings where a
run's branch lives (``lean_writes`` off writes no marker, and its branches stay in the
run's item), and a worker of any version that knows markers reads the run the same way.
A source with a marker claims none of its branches in its commit (the leases would land in
the run's item): each branch claims its own item, from the source's worker's copy.

**The join.** A branch commits into its own item, so the run's item sees no arrival. Each
branch adds its index to the coordination store's idempotent set (``join_add``) once its
commit landed — again on a redelivery, which is harmless — and the branch whose add
completes the set reads the run, with every branch item, and decides the join from the
records as any last arrival does. A context write a branch makes to other keys (shared
keys) goes to the run's item after its commit, and is kept in the branch's item as well
(``_flowcraft.writes.<branch>``): a redelivered job writes it again before it counts the
arrival, so the join never runs without it.

**Reads.** :meth:`BranchItemsContext.load` reads the run's item and, for every marker, the
branch items (``load_many``: one ``BatchGetItem`` per 100 on DynamoDB) and presents one
context, as if everything were in one item. A claim that is not from a copy reads the
run's item and the branch's. What a wide fan's run no longer gets is the extra conditions
of a claim from a copy on the run's item: a branch queued before the run was cancelled
still runs (its result is kept; the join is not started, as the last arrival reads the
run).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..context import INTERNAL_PREFIX, AsyncContextBase, PatchOperation, apply_patch
from ..core import graph as graph_module
from ..core.graph import Graph
from ..core.routing import INPUTS_PREFIX, OUTPUTS_PREFIX, RECORD_PREFIX
from .context import (
    ATTEMPTS_PREFIX,
    LOCK_PREFIX,
    Claim,
    ClaimStatus,
    DistributedContext,
    attempts,
    attempts_key,
    id_digest,
    lock_key,
)
from .coordination import COORDINATION_TTL_SECONDS, KEY_PREFIX

ITEMS_PREFIX = f"{INTERNAL_PREFIX}items."
"""``_flowcraft.items.<source>``: the source's branches live in items of their own."""
WRITES_PREFIX = f"{INTERNAL_PREFIX}writes."
"""``_flowcraft.writes.<branch>``: a branch's writes to shared keys, kept in its item."""
_NODE_PREFIXES = (RECORD_PREFIX, LOCK_PREFIX, ATTEMPTS_PREFIX, OUTPUTS_PREFIX, INPUTS_PREFIX,
                  WRITES_PREFIX)
READ_BATCH = 100
"""Branch items read at once (DynamoDB's ``BatchGetItem`` limit)."""


def items_key(source: str) -> str:
    return ITEMS_PREFIX + source


def writes_key(node_id: str) -> str:
    return WRITES_PREFIX + node_id


@dataclass(frozen=True, slots=True)
class NodeHome:
    """Where a branch lives: branch ``index`` of ``source``, which leads to ``join``."""

    source: str
    index: int
    join: str
    width: int


def branch_run_id(run_id: str, source: str, index: int) -> str:
    """The derived run id of a branch's item."""
    return f"{run_id}~fan~{id_digest(source)}~{index}"


def join_set_key(run_id: str, source: str) -> str:
    """The coordination store's set of a wide fan's branches that have committed."""
    return f"{KEY_PREFIX}fan:{run_id}:{source}"


def candidate(graph: Graph, node_id: str) -> NodeHome | None:
    """Where ``node_id`` lives if its run holds its source's marker (``None``: in the run's
    item whatever the run holds)."""
    predecessors = graph.root.forward_predecessors.get(node_id)
    if not predecessors or len(predecessors) != 1:
        return None
    fan = graph.plain_fans.get(predecessors[0])
    if fan is None or node_id not in fan.branches:
        return None
    return NodeHome(fan.source, fan.branches.index(node_id), fan.join, len(fan.branches))


def marker(graph: Graph, node_id: str) -> dict[str, Any] | None:
    """The marker a wide fan's source writes in its commit (``None``: not a wide fan)."""
    fan = graph.plain_fans.get(node_id)
    return None if fan is None else {"n": len(fan.branches), "join": fan.join}


def owner_of(key: str) -> str | None:
    """The node a context key belongs to, for the keys a branch item holds."""
    for prefix in _NODE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def split(node_id: str, operations: Iterable[PatchOperation]
          ) -> tuple[list[PatchOperation], list[PatchOperation]]:
    """``operations`` as (those on the branch's own keys, those on shared keys)."""
    own: list[PatchOperation] = []
    shared: list[PatchOperation] = []
    for op in operations:
        (own if owner_of(op.key) == node_id else shared).append(op)
    return own, shared


class BranchItemsContext(AsyncContextBase):
    """A run's context as one, over the run's item and its wide fans' branch items."""

    def __init__(self, store: Any, run_id: str, graph: Graph | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.run: DistributedContext = store.context(run_id)
        self.graph = graph
        """The run's graph: where its branches may live (``None``: found from the markers)."""
        self.placed: dict[str, NodeHome] = {}

    # -- placement -------------------------------------------------------------------------

    def home(self, node_id: str) -> NodeHome | None:
        """Where ``node_id`` lives, once a claim found it in a branch item."""
        return self.placed.get(node_id)

    def _candidate(self, node_id: str) -> NodeHome | None:
        return None if self.graph is None else candidate(self.graph, node_id)

    def _branch(self, home: NodeHome) -> DistributedContext:
        context: DistributedContext = self.store.context(
            branch_run_id(self.run_id, home.source, home.index))
        return context

    # -- reads -----------------------------------------------------------------------------

    async def load(self) -> dict[str, Any] | None:
        return await self._merged(await self.run.load())

    def _markers(self, data: Mapping[str, Any]) -> list[tuple[str, int]]:
        """The wide fans ``data`` marks as stored in branch items: (source, branches). With
        the graph, a lookup per plain fan; without it, a look at every key."""
        sources: Iterable[str] = (
            self.graph.plain_fans if self.graph is not None
            else (key[len(ITEMS_PREFIX):] for key in data if key.startswith(ITEMS_PREFIX)))
        return [(source, int(value.get("n") or 0)) for source in sources
                if isinstance(value := data.get(items_key(source)), Mapping)]

    async def _merged(self, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """``data`` (the run's item) with every branch item its markers name merged in."""
        ids = [branch_run_id(self.run_id, source, index)
               for source, width in self._markers(data or {}) for index in range(width)]
        if data is None or not ids:
            return data
        for branch in (await load_many(self.store, ids)).values():
            if branch:
                data.update(branch)
        return data

    async def get(self, key: str, default: Any = None) -> Any:
        """A shared key is read from the run's item alone (a cancellation check of a long
        branch reads one item, not every branch)."""
        if owner_of(key) is None:
            return (await self.run.load() or {}).get(key, default)
        return (await self.load() or {}).get(key, default)

    # -- the distributed operations --------------------------------------------------------

    async def create(self, initial: Mapping[str, Any]) -> None:
        await self.run.create(initial)

    async def claim(self, node_id: str, iteration: int, owner: str,
                    lease_seconds: float, *, count_attempt: bool = True,
                    base: Mapping[str, Any] | None = None, create: bool = False) -> Claim:
        home = self._candidate(node_id)
        if home is not None and base is not None and items_key(home.source) in base:
            return await self._claim_branch(node_id, home, iteration, owner, lease_seconds,
                                            count_attempt, base, None)
        claim = await self.run.claim(node_id, iteration, owner, lease_seconds,
                                     count_attempt=count_attempt, base=base)
        if claim.data is None or not self._markers(claim.data):
            return claim  # a run with no branch items: the store's answer is the run
        if home is not None and items_key(home.source) in claim.data:
            # The branch lives in its item (a claim that is not from a copy learns it from
            # the run's item): the lease just taken there is given back.
            if claim.status is ClaimStatus.CLAIMED:
                await self.run.release(node_id, owner, attempts=attempts(claim.data, node_id)
                                       - (1 if count_attempt else 0))
            run_data = {key: value for key, value in claim.data.items()
                        if owner_of(key) != node_id}
            return await self._claim_branch(node_id, home, iteration, owner, lease_seconds,
                                            count_attempt, None, run_data)
        if base is not None and claim.status is ClaimStatus.CLAIMED:
            # From the copy, which holds the branches (a store that ignores ``base``
            # answers with the run's item, which does not).
            return Claim(claim.status, {**base, **claim.data}, claim.holder, claim.expires)
        return Claim(claim.status, await self._merged(claim.data), claim.holder,
                     claim.expires)

    async def claim_together(self, claims: Sequence[tuple[str, int, str]],
                             lease_seconds: float, base: Mapping[str, Any]
                             ) -> list[dict[str, Any]] | None:
        """Several claims from copies of the run (``base``: one of them) in one write, when
        the store can (``None``: it cannot, or one of them would not succeed so, or one of
        the nodes lives in a branch item)."""
        together = getattr(self.run, "claim_together", None)
        if together is None or any(
                (home := self._candidate(node_id)) is not None
                and items_key(home.source) in base for node_id, _, _ in claims):
            return None
        written: list[dict[str, Any]] | None = await together(claims, lease_seconds)
        return written

    async def _claim_branch(self, node_id: str, home: NodeHome, iteration: int, owner: str,
                            lease_seconds: float, count_attempt: bool,
                            base: Mapping[str, Any] | None,
                            run_data: dict[str, Any] | None) -> Claim:
        """Claim a branch in its own item; the answer is the copy (``base``), or the run's
        item (``run_data``), with the branch's item over it."""
        self.placed[node_id] = home
        claim = await self._branch(home).claim(node_id, iteration, owner, lease_seconds,
                                               count_attempt=count_attempt, base=base,
                                               create=True)
        # (A store that ignores ``base`` answers with the branch's item alone.)
        data = {**(base if base is not None else run_data or {}), **(claim.data or {})}
        return Claim(claim.status, data, claim.holder, claim.expires)

    async def commit(self, node_id: str, iteration: int, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Iterable[tuple[str, int]] = (),
                     lease_seconds: float = 60.0, *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        home = self.placed.get(node_id)
        if home is None:
            answer = await self.run.commit(node_id, iteration, owner, operations, claims,
                                           lease_seconds, base=base, counts=counts)
            if answer is None or base is None:
                return await self._merged(answer)
            if not self._markers(answer):
                return answer  # a run with no branch items: the store's answer is the run
            # The copy with this write (a store that ignores ``base`` answers with the run's
            # item, which lacks the branches: they come from the copy).
            return _over_copy(base, answer, node_id, operations)
        claims = list(claims)
        if claims:
            raise ValueError(f"node '{node_id}' lives in a branch item: its commit cannot "
                             "claim other nodes")
        own, shared = split(node_id, operations)
        if shared:  # kept in the branch's item, so a redelivered job can write them again
            own.append(PatchOperation("set", writes_key(node_id),
                                      [[op.op, op.key, op.value] for op in shared]))
        # The arrival is counted by the caller in the coordination store (module docstring).
        answer = await self._branch(home).commit(node_id, iteration, owner, own,
                                                 base=base if base is not None else None)
        if answer is None:
            return None
        if shared:
            await self.run.apply(shared)
        if base is not None:
            # The copy plus the whole write (a store that ignores ``base`` answers with the
            # branch's item alone).
            answer = _over_copy(base, answer, node_id, operations)
            apply_patch(answer, shared)
            return answer
        return await self.load()

    async def settle(self, node_id: str, data: dict[str, Any]) -> None:
        """Write again the shared writes of a committed branch, kept in its item (a job whose
        commit answer was lost, or a redelivered one: the first attempt may have stopped
        between its commit and that write), and lay them over ``data`` too."""
        kept = data.get(writes_key(node_id)) if node_id in self.placed else None
        if kept:
            operations = [PatchOperation(op, key, value) for op, key, value in kept]
            await self.run.apply(operations)
            apply_patch(data, operations)

    async def renew(self, node_id: str, owner: str, lease_seconds: float) -> bool:
        home = self.placed.get(node_id)
        target = self.run if home is None else self._branch(home)
        return await target.renew(node_id, owner, lease_seconds)

    async def release(self, node_id: str, owner: str, *, attempts: int | None = None) -> None:
        home = self.placed.get(node_id)
        target = self.run if home is None else self._branch(home)
        await target.release(node_id, owner, attempts=attempts)

    async def apply(self, operations: Sequence[PatchOperation]) -> dict[str, Any] | None:
        own: dict[str, list[PatchOperation]] = {}
        shared: list[PatchOperation] = []
        for op in operations:
            owner = owner_of(op.key)
            if owner is not None and owner in self.placed:
                own.setdefault(owner, []).append(op)
            else:
                shared.append(op)
        for node_id, ops in own.items():
            await self._branch(self.placed[node_id]).apply(ops)
        answer = await self.run.apply(shared) if shared else await self.run.load()
        return await self._merged(answer)


def _over_copy(base: Mapping[str, Any], answer: Mapping[str, Any], node_id: str,
               operations: Sequence[PatchOperation]) -> dict[str, Any]:
    """A commit's answer laid over the caller's copy, without what the commit removed."""
    gone = {op.key for op in operations if op.op == "delete"}
    gone.update((lock_key(node_id), attempts_key(node_id)))
    merged = {key: value for key, value in base.items() if key not in gone}
    merged.update(answer)
    return merged


async def load_many(store: Any, run_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """The contexts of ``run_ids`` (absent ones ``None``): the store's ``load_many`` when it
    has one, else one ``load`` each, a few at a time."""
    found: dict[str, dict[str, Any] | None] = {}
    many = getattr(store, "load_many", None)
    for start in range(0, len(run_ids), READ_BATCH):
        batch = run_ids[start:start + READ_BATCH]
        if many is not None:
            found.update(await many(batch))
        else:
            from .ledger import bounded
            loaded = await bounded(lambda run_id: store.context(run_id).load(), batch)
            found.update(zip(batch, loaded, strict=True))
    return found


def run_context(store: Any, run_id: str, graph: Graph | None = None) -> BranchItemsContext:
    """The context of run ``run_id`` in ``store``, its branch items included; ``graph`` (the
    run's blueprint) tells where its branches may live, for the job that runs one."""
    return BranchItemsContext(store, run_id, graph)


def mark_wide_fan(graph: Graph, node_id: str, working: dict[str, Any],
                  operations: list[PatchOperation], enabled: bool) -> bool:
    """Add the marker of a wide fan to the commit of its source (``enabled``: the worker
    writes lean and its coordination store counts sets); whether it did. The commit then
    claims none of the branches."""
    value = marker(graph, node_id) if enabled and not graph.dynamic_node_ids else None
    if value is None or value["n"] < graph_module.WIDE_FAN_MIN_BRANCHES:
        return False
    operations.append(PatchOperation("set", items_key(node_id), value))
    working[items_key(node_id)] = value
    return True


async def arrive(context: DistributedContext, coordination: Any, node_id: str,
                 data: dict[str, Any], *, redelivered: bool = False) -> dict[str, Any]:
    """After the commit of a branch that lives in its own item: count its arrival at the join
    (``join_add``, idempotent) and, when it completes the count, read the whole run (every
    branch's record and output) for the join's decision. A redelivered job first writes the
    branch's shared writes again (:meth:`BranchItemsContext.settle`). Other nodes: ``data``."""
    home = context.home(node_id) if isinstance(context, BranchItemsContext) else None
    if home is None:
        return data
    assert isinstance(context, BranchItemsContext)
    if redelivered:
        await context.settle(node_id, data)
    count = await coordination.join_add(join_set_key(context.run_id, home.source),
                                        str(home.index), COORDINATION_TTL_SECONDS)
    if count < home.width:
        return data
    return await context.load() or data

