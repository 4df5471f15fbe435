"""The run store contract: what a stored run context must do, whatever holds it.

A new backend must pass this suite: add its context to the ``runs`` fixture's parameters
(and to ``limited_runs`` when its items have a size limit).

The job algorithm of :mod:`flowcraft.distributed.adapter` is built on the operations of
:class:`~flowcraft.distributed.context.DistributedContext`, each one conditional write that
returns the context as it is afterwards. The suite states their rules once and runs them on
the in-process store (:class:`~flowcraft.distributed.context.InMemoryRunStore`), on
``DynamoDbContext`` (a moto server) and on ``CosmosDbContext`` (the local Cosmos DB server):

* ``create`` stores a new run and refuses a taken run id, leaving the stored run untouched;
* ``load`` returns every key as it was written (odd names and value types included);
* ``claim`` takes a node's lease when the node has not completed the iteration and nobody
  else holds a live lease, counting the attempt in the same write
  (``CLAIMED``/``LOCKED``/``DONE``/``MISSING``);
* ``commit`` writes only while its caller holds the lease, returns the merged context, and
  leases the successors it names to the committer;
* ``release``, ``renew`` and ``apply``; concurrent writers of one run lose nothing;
* a context over the backend's item limit is refused with ``ContextTooLargeError`` and
  nothing is written (DynamoDB, Cosmos DB).

Lease owners are mixed-case on purpose: the local Cosmos server lower-cases the conditions
it evaluates, and ownership must survive that.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from aws_helpers import make_moto_dynamodb_atomic
from azure_helpers import context_of
from flowcraft import ContextTooLargeError, PatchOperation
from flowcraft.core.routing import output_key, record_key
from flowcraft.distributed.context import (
    Claim,
    ClaimStatus,
    DistributedContext,
    InMemoryRunStore,
    attempts_key,
    lock_key,
)
from flowcraft.errors import RunAlreadyExistsError

OWNER = "Worker-A:1"
OTHER = "Worker-B:2"
LEASE = 30.0


@dataclass
class RunStore:
    """Fresh run contexts on one backend: ``runs.context()`` names a new run,
    ``runs.context(run_id)`` another view of a run (as a second worker would have)."""

    name: str
    open: Callable[[str], DistributedContext]
    limit_bytes: int | None = None
    service: str | None = None

    def context(self, run_id: str | None = None) -> DistributedContext:
        return self.open(run_id or f"run-{uuid.uuid4().hex}")


def _memory_runs() -> RunStore:
    store = InMemoryRunStore()
    return RunStore("memory", store.context)


def _dynamodb_runs(request: pytest.FixtureRequest) -> RunStore:
    from flowcraft.adapters.aws import DynamoDbContext
    from flowcraft.adapters.aws._dynamo import ITEM_LIMIT_BYTES

    # moto applies concurrent updates of one item non-atomically (see aws_helpers).
    make_moto_dynamodb_atomic(request.getfixturevalue("monkeypatch"))
    aws = request.getfixturevalue("aws")
    return RunStore("dynamodb", lambda run_id: DynamoDbContext(
        run_id, client=aws.dynamodb, table_name=aws.context_table), ITEM_LIMIT_BYTES, "DynamoDB")


def _cosmos_runs(request: pytest.FixtureRequest) -> RunStore:
    from flowcraft.adapters.azure._cosmos import ITEM_LIMIT_BYTES

    azure = request.getfixturevalue("azure")
    return RunStore("cosmos", lambda run_id: context_of(azure, run_id), ITEM_LIMIT_BYTES,
                    "Cosmos DB")


@pytest.fixture(params=["memory", "dynamodb", "cosmos"])
def runs(request: pytest.FixtureRequest) -> RunStore:
    if request.param == "memory":
        return _memory_runs()
    if request.param == "dynamodb":
        return _dynamodb_runs(request)
    return _cosmos_runs(request)


@pytest.fixture(params=["dynamodb", "cosmos"])
def limited_runs(request: pytest.FixtureRequest) -> RunStore:
    """The backends whose items have a size limit."""
    runs = _dynamodb_runs(request) if request.param == "dynamodb" else _cosmos_runs(request)
    assert runs.limit_bytes is not None
    return runs


def done(node_id: str, iteration: int = 0, output: Any = "out") -> list[PatchOperation]:
    """A node's commit as the job algorithm writes it: its output and its routing record."""
    return [PatchOperation("set", output_key(node_id), output),
            PatchOperation("set", record_key(node_id), {"n": iteration + 1, "taken": []})]


def assert_lease(data: dict[str, Any], node_id: str, owner: str, iteration: int,
                 lease_seconds: float) -> None:
    lease = data[lock_key(node_id)]
    assert {k: v for k, v in lease.items() if k != "expires"} == {"owner": owner,
                                                                  "n": iteration}
    assert abs(lease["expires"] - (time.time() + lease_seconds)) < 5, lease


# =============================================================================================
# create and load
# =============================================================================================

VALUES: dict[str, Any] = {
    "int": 1, "negative": -7, "zero": 0, "big": 2**53, "float": 2.5, "small": 1e-7,
    "neg_float": -0.125, "flag": True, "off": False, "nothing": None, "text": "x",
    "empty": "", "list": [1, "two", None, [3.5]], "empty_list": [], "empty_map": {},
    "nested": {"a": [1, 2.25, {"b": 0, "c": [10, -1.5]}], "d": {"e": 99}},
    "unicode": "Ünïcödé ✓ \U0001F600", "quotes": "'\"\\",
}


async def test_create_then_load_returns_the_initial_context(runs: RunStore) -> None:
    context = runs.context()
    await context.create(VALUES)
    loaded = await context.load()
    assert loaded == VALUES
    assert loaded is not None
    for name in ("int", "negative", "zero", "big"):
        assert type(loaded[name]) is int, name
    for name in ("float", "small", "neg_float"):
        assert type(loaded[name]) is float, name
    assert type(loaded["nested"]["a"][0]) is int and type(loaded["nested"]["a"][1]) is float
    assert type(loaded["flag"]) is bool
    # Another view of the run (another worker) reads the same.
    assert await runs.context(context.run_id).load() == VALUES


async def test_an_unknown_run_reads_as_absent_and_is_never_written(runs: RunStore) -> None:
    context = runs.context()
    assert await context.load() is None
    assert await context.get("k", "default") == "default"
    assert await context.has("k") is False
    assert await context.to_dict() == {}
    claim = await context.claim("a", 0, OWNER, LEASE)
    assert claim.status is ClaimStatus.MISSING and claim.data is None
    assert await context.commit("a", 0, OWNER, done("a")) is None
    assert await context.renew("a", OWNER, LEASE) is False
    await context.release("a", OWNER, attempts=0)
    assert await context.apply([PatchOperation("set", "k", 1)]) is None
    assert await context.load() is None  # none of them created the run


async def test_create_refuses_a_taken_run_id_and_leaves_the_run_untouched(
        runs: RunStore) -> None:
    context = runs.context()
    await context.create({"first": 1})
    await context.set("later", 2)
    again = runs.context(context.run_id)
    with pytest.raises(RunAlreadyExistsError) as raised:
        await again.create({"second": 2})
    assert raised.value.run_id == context.run_id and context.run_id in str(raised.value)
    assert await context.load() == {"first": 1, "later": 2}


async def test_concurrent_creates_of_one_run_id_have_one_winner(runs: RunStore) -> None:
    run_id = f"race-{uuid.uuid4().hex}"

    async def create(i: int) -> int:
        await runs.context(run_id).create({"creator": i})
        return i

    outcomes = await asyncio.gather(*(create(i) for i in range(5)), return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, int)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, RunAlreadyExistsError) for o in outcomes if o not in winners)
    assert await runs.context(run_id).load() == {"creator": winners[0]}


ODD_KEYS: dict[str, Any] = {
    "plain": 1, "camelCase": "x", "a/b": [1, 2], "t~x": {"n": None}, "with space": True,
    "Ünïcödé ✓": "ok", "_outputs.fetchUser": {"nested": {"deep": [1, {"x": 1.5}]}},
    "select": "not a query", "quote\"d": "'\"", "a.b.c": 3,
    # Names a backend uses for the item itself: stored aside, never dropped or confused.
    "runId": "the caller's own id", "id": "my id", "~runId": "tilde", "~": 1,
    "context": {"user": "Ada"}, "ttl": 5, "_etag": "e", "_rid": "r", "_ts": 0,
}


async def test_every_key_round_trips(runs: RunStore) -> None:
    context = runs.context()
    half = dict(list(ODD_KEYS.items())[::2])
    await context.create(half)
    for key, value in ODD_KEYS.items():
        if key not in half:
            await context.set(key, value)
    assert await context.load() == ODD_KEYS
    for key, value in ODD_KEYS.items():
        assert await context.get(key) == value, key
        assert await context.has(key), key
    await context.patch([PatchOperation("set", "runId", "changed"),
                         PatchOperation("delete", "context"), PatchOperation("set", "~x", 3)])
    assert await context.delete("id") is True
    expected = {**ODD_KEYS, "runId": "changed", "~x": 3}
    del expected["context"], expected["id"]
    assert await runs.context(context.run_id).to_dict() == expected


async def test_the_async_context_methods(runs: RunStore) -> None:
    context = runs.context()
    await context.create({"a": 1})
    await context.set("b", {"c": [1, 2]})
    assert await context.get("b") == {"c": [1, 2]}
    assert await context.get("missing", "default") == "default"
    assert await context.get("missing") is None
    assert await context.has("a") and not await context.has("missing")
    assert await context.delete("a") is True
    assert await context.delete("a") is False
    assert not await context.has("a")
    await context.patch([PatchOperation("set", "x", 1.5), PatchOperation("delete", "b"),
                         PatchOperation("delete", "never-existed"),
                         PatchOperation("set", "y", 1), PatchOperation("set", "y", "last")])
    assert await context.to_dict() == {"x": 1.5, "y": "last"}


# =============================================================================================
# claim
# =============================================================================================


async def test_claim_takes_the_lease_and_counts_the_attempt(runs: RunStore) -> None:
    context = runs.context()
    await context.create({"in": 1})
    claim = await context.claim("a", 0, OWNER, LEASE)
    assert claim.status is ClaimStatus.CLAIMED and claim.holder == OWNER
    assert claim.data is not None and claim.data["in"] == 1
    assert_lease(claim.data, "a", OWNER, 0, LEASE)
    assert claim.data[attempts_key("a")] == 1
    assert await context.load() == claim.data  # the claim returned the stored context

    # The holder may claim again (a redelivered job on the same worker): another attempt.
    again = await context.claim("a", 0, OWNER, LEASE)
    assert again.status is ClaimStatus.CLAIMED
    assert again.data is not None and again.data[attempts_key("a")] == 2

    # A claim that does not count (the job only looks) leaves the count alone.
    quiet = await context.claim("a", 0, OWNER, LEASE, count_attempt=False)
    assert quiet.status is ClaimStatus.CLAIMED
    assert quiet.data is not None and quiet.data[attempts_key("a")] == 2


async def test_claim_is_locked_while_another_owner_holds_a_live_lease(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    first = await context.claim("a", 0, OWNER, LEASE)
    assert first.status is ClaimStatus.CLAIMED
    other = runs.context(context.run_id)
    locked = await other.claim("a", 0, OTHER, LEASE)
    assert locked.status is ClaimStatus.LOCKED
    assert locked.holder == OWNER
    assert locked.expires is not None and locked.expires > time.time() + LEASE - 5
    assert locked.data is not None
    assert locked.data[attempts_key("a")] == 1  # a refused claim is not an attempt
    assert_lease(locked.data, "a", OWNER, 0, LEASE)
    # Other nodes of the run are free.
    assert (await other.claim("b", 0, OTHER, LEASE)).status is ClaimStatus.CLAIMED


async def test_an_expired_lease_is_taken_over(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    assert (await context.claim("a", 0, OWNER, 0.5)).status is ClaimStatus.CLAIMED
    await asyncio.sleep(0.8)
    taken = await runs.context(context.run_id).claim("a", 0, OTHER, LEASE)
    assert taken.status is ClaimStatus.CLAIMED and taken.holder == OTHER
    assert taken.data is not None
    assert_lease(taken.data, "a", OTHER, 0, LEASE)
    assert taken.data[attempts_key("a")] == 2  # the dead owner's attempt still counts
    # The first owner lost the lease: its commit, renewal and release do nothing.
    assert await context.commit("a", 0, OWNER, done("a", output="stale")) is None
    assert await context.renew("a", OWNER, LEASE) is False
    await context.release("a", OWNER, attempts=0)
    data = await context.load()
    assert data is not None and output_key("a") not in data
    assert_lease(data, "a", OTHER, 0, LEASE)
    assert data[attempts_key("a")] == 2


async def test_claim_of_a_completed_iteration_is_done(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    assert (await context.claim("a", 0, OWNER, LEASE)).status is ClaimStatus.CLAIMED
    assert await context.commit("a", 0, OWNER, done("a")) is not None
    for owner in (OWNER, OTHER):  # a redelivered job, on any worker
        claim = await runs.context(context.run_id).claim("a", 0, owner, LEASE)
        assert claim.status is ClaimStatus.DONE
        assert claim.data is not None and claim.data[output_key("a")] == "out"
        assert lock_key("a") not in claim.data and attempts_key("a") not in claim.data
    # The next iteration of a loop is claimable, and counts from one again.
    loop = await context.claim("a", 1, OTHER, LEASE)
    assert loop.status is ClaimStatus.CLAIMED
    assert loop.data is not None and loop.data[attempts_key("a")] == 1
    assert_lease(loop.data, "a", OTHER, 1, LEASE)
    assert (await context.claim("a", 0, OWNER, LEASE)).status is ClaimStatus.DONE


async def test_concurrent_claims_have_one_winner(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    owners = [f"Worker-{i}" for i in range(8)]
    claims: list[Claim] = await asyncio.gather(*(
        runs.context(context.run_id).claim("a", 0, owner, LEASE) for owner in owners))
    statuses = [claim.status for claim in claims]
    assert statuses.count(ClaimStatus.CLAIMED) == 1, statuses
    assert statuses.count(ClaimStatus.LOCKED) == len(owners) - 1, statuses
    winner = owners[statuses.index(ClaimStatus.CLAIMED)]
    assert {claim.holder for claim in claims} == {winner}
    data = await context.load()
    assert data is not None and data[attempts_key("a")] == 1
    assert_lease(data, "a", winner, 0, LEASE)


# =============================================================================================
# commit
# =============================================================================================


async def test_commit_with_the_lease_writes_and_returns_the_merged_context(
        runs: RunStore) -> None:
    context = runs.context()
    await context.create({"keep": 1, "drop": 2})
    assert (await context.claim("a", 0, OWNER, LEASE)).status is ClaimStatus.CLAIMED
    # Another worker writes meanwhile: the commit must not overwrite it.
    await runs.context(context.run_id).apply([PatchOperation("set", "theirs", "t")])
    committed = await context.commit(
        "a", 0, OWNER, [*done("a", output={"total": 7.5}), PatchOperation("delete", "drop"),
                        PatchOperation("set", "mine", [1])],
        claims=[("b", 0), ("c", 2)], lease_seconds=LEASE)
    assert committed is not None
    assert committed == await context.load()
    assert committed["keep"] == 1 and committed["theirs"] == "t" and committed["mine"] == [1]
    assert "drop" not in committed
    assert committed[output_key("a")] == {"total": 7.5}
    assert committed[record_key("a")] == {"n": 1, "taken": []}
    # Our lease and the attempt count are gone; the successors are leased to us.
    assert lock_key("a") not in committed and attempts_key("a") not in committed
    assert_lease(committed, "b", OWNER, 0, LEASE)
    assert_lease(committed, "c", OWNER, 2, LEASE)
    other = runs.context(context.run_id)
    assert (await other.claim("b", 0, OTHER, LEASE)).status is ClaimStatus.LOCKED
    continued = await context.claim("b", 0, OWNER, LEASE)
    assert continued.status is ClaimStatus.CLAIMED


async def test_commit_with_a_base_writes_the_same_and_answers_from_it_until_the_run_ends(
        runs: RunStore) -> None:
    """``base``: the store may answer with the caller's copy plus the write (the AWS store
    does, reading nothing back); stored, the write is the same either way. Once the run has
    ended (``_flowcraft.run`` is set) the answer is the stored run, so the caller sees it."""
    context = runs.context()
    await context.create({"keep": 1})
    claim = await context.claim("a", 0, OWNER, LEASE)
    assert claim.status is ClaimStatus.CLAIMED and claim.data is not None
    await runs.context(context.run_id).apply([PatchOperation("set", "theirs", "t")])
    base = {**claim.data, "mine": [1]}
    committed = await context.commit(
        "a", 0, OWNER, [*done("a", output=3), PatchOperation("set", "mine", [1])],
        claims=[("b", 0)], lease_seconds=LEASE, base=base)
    assert committed is not None
    stored = await context.load()
    assert stored is not None and stored["theirs"] == "t" and stored["mine"] == [1]
    # Whatever the store answered holds the write and everything in base.
    assert committed[output_key("a")] == 3 == stored[output_key("a")]
    assert committed[record_key("a")] == stored[record_key("a")] == {"n": 1, "taken": []}
    assert committed["keep"] == 1 and committed["mine"] == [1]
    if runs.name in ("memory", "dynamodb"):  # these answer from base: no read-back
        assert "theirs" not in committed
    assert lock_key("a") not in committed and attempts_key("a") not in committed
    assert_lease(committed, "b", OWNER, 0, LEASE)
    assert_lease(stored, "b", OWNER, 0, LEASE)

    ended = runs.context()
    await ended.create({})
    claim = await ended.claim("a", 0, OWNER, LEASE)
    assert claim.data is not None
    state = {"status": "cancelled", "reason": "by hand"}
    await runs.context(ended.run_id).apply([PatchOperation("set", "_flowcraft.run", state)])
    answer = await ended.commit("a", 0, OWNER, done("a", output=4), claims=[("b", 0)],
                                lease_seconds=LEASE, base=claim.data)
    assert answer is not None and answer["_flowcraft.run"] == state
    assert answer[output_key("a")] == 4
    # Without the lease, nothing is written, base or not.
    assert await ended.commit("a", 0, OWNER, done("a", output=5), base=claim.data) is None


async def test_claim_with_a_base_answers_from_it_and_refuses_as_any_claim(
        runs: RunStore) -> None:
    """``base``: a claim that succeeds on a run that has not ended may be answered with the
    caller's copy plus the lease and the attempt count (the AWS store reads nothing back).
    A claim the store refuses is answered as without a base: LOCKED, DONE, and a claim on
    an ended run comes back with the stored run, so the caller sees the end."""
    context = runs.context()
    await context.create({"x": 1})
    await runs.context(context.run_id).apply([PatchOperation("set", "theirs", "t")])
    base = {"x": 1, "copied": True}
    claim = await context.claim("a", 0, OWNER, LEASE, base=base)
    assert claim.status is ClaimStatus.CLAIMED and claim.data is not None
    assert claim.data["x"] == 1 and claim.data[attempts_key("a")] == 1
    assert_lease(claim.data, "a", OWNER, 0, LEASE)
    if runs.name in ("memory", "dynamodb"):
        assert claim.data["copied"] is True and "theirs" not in claim.data
    stored = await context.load()
    assert stored is not None and "copied" not in stored and stored[attempts_key("a")] == 1
    assert_lease(stored, "a", OWNER, 0, LEASE)

    locked = await runs.context(context.run_id).claim("a", 0, OTHER, LEASE, base=base)
    assert locked.status is ClaimStatus.LOCKED and locked.holder == OWNER
    assert await context.commit("a", 0, OWNER, done("a")) is not None
    again = await runs.context(context.run_id).claim("a", 0, OTHER, LEASE, base=base)
    assert again.status is ClaimStatus.DONE

    # A node parked, or running a map, has no record: the copy may not show it, the answer
    # must (it is the stored run's).
    await context.apply([PatchOperation("set", "_awaitingNodeIds", ["p", "q"]),
                         PatchOperation("set", "_flowcraft.map.m", {"token": "t"})])
    parked = await context.claim("q", 0, OWNER, LEASE, base=base)
    assert parked.data is not None and parked.data["_awaitingNodeIds"] == ["p", "q"]
    mapping = await context.claim("m", 0, OWNER, LEASE, base=base)
    assert mapping.data is not None and mapping.data["_flowcraft.map.m"] == {"token": "t"}
    other = await context.claim("r", 0, OWNER, LEASE, base=base)
    assert other.data is not None
    if runs.name in ("memory", "dynamodb"):
        assert "_awaitingNodeIds" not in other.data  # not parked: answered from the copy

    state = {"status": "failed", "reason": "elsewhere"}
    await context.apply([PatchOperation("set", "_flowcraft.run", state)])
    ended = await context.claim("b", 0, OWNER, LEASE, base=base)
    assert ended.data is not None and ended.data["_flowcraft.run"] == state


async def test_a_claim_with_create_makes_a_missing_item(runs: RunStore) -> None:
    """``create``: the first claim of a branch item makes the item (a plain claim of a run
    that is not stored answers MISSING and writes nothing)."""
    context = runs.context()
    assert (await context.claim("a", 0, OWNER, LEASE)).status is ClaimStatus.MISSING
    assert await context.load() is None
    claim = await context.claim("a", 0, OWNER, LEASE, create=True)
    assert claim.status is ClaimStatus.CLAIMED and claim.data is not None
    assert claim.data[attempts_key("a")] == 1
    assert_lease(claim.data, "a", OWNER, 0, LEASE)
    again = await runs.context(context.run_id).claim("a", 0, OTHER, LEASE, create=True)
    assert again.status is ClaimStatus.LOCKED and again.holder == OWNER


@pytest.fixture(params=["memory", "dynamodb"])
def together_runs(request: pytest.FixtureRequest) -> RunStore:
    """The stores that claim several nodes in one write (``claim_together``)."""
    return _memory_runs() if request.param == "memory" else _dynamodb_runs(request)


async def test_claims_together_take_every_lease_or_none(together_runs: RunStore) -> None:
    context = together_runs.context()
    await context.create({"x": 1})
    together = context.claim_together  # type: ignore[attr-defined]  # memory, DynamoDB
    written = await together([("a", 0, OWNER), ("b", 0, OTHER)], LEASE)
    assert [sorted(w) for w in written] == [[attempts_key("a"), lock_key("a")],
                                            [attempts_key("b"), lock_key("b")]]
    assert_lease(written[1], "b", OTHER, 0, LEASE)
    stored = await context.load()
    assert stored is not None and stored[attempts_key("a")] == 1
    assert_lease(stored, "a", OWNER, 0, LEASE)
    assert_lease(stored, "b", OTHER, 0, LEASE)
    # "a" is leased by OWNER: a batch that needs it for OTHER takes nothing, "c" included.
    assert await together([("c", 0, OTHER), ("a", 0, OTHER)], LEASE) is None
    assert await together([("d", 0, OWNER), ("b", 0, OWNER)], LEASE) is None
    unchanged = await context.load()
    assert unchanged is not None and lock_key("c") not in unchanged
    assert attempts_key("d") not in unchanged and unchanged[attempts_key("a")] == 1
    assert await context.commit("c", 0, OWNER, done("c")) is None  # nobody holds "c"
    await context.apply([PatchOperation("set", record_key("e"), {"n": 1, "taken": []})])
    assert await together([("f", 0, OWNER), ("e", 0, OWNER)], LEASE) is None  # e is done
    await context.apply([PatchOperation("set", "_flowcraft.run", {"status": "cancelled"})])
    assert await together([("f", 0, OWNER), ("g", 0, OWNER)], LEASE) is None  # run ended


async def test_commit_without_the_lease_writes_nothing(runs: RunStore) -> None:
    context = runs.context()
    await context.create({"x": 1})
    # Never claimed.
    assert await context.commit("a", 0, OWNER, done("a")) is None
    # Claimed by someone else.
    assert (await context.claim("a", 0, OTHER, LEASE)).status is ClaimStatus.CLAIMED
    assert await context.commit("a", 0, OWNER, done("a", output="mine"),
                                claims=[("b", 0)]) is None
    data = await context.load()
    assert data is not None
    assert output_key("a") not in data and lock_key("b") not in data
    assert_lease(data, "a", OTHER, 0, LEASE)
    # After the holder committed, a late commit of the same node changes nothing.
    assert await context.commit("a", 0, OTHER, done("a", output="theirs")) is not None
    assert await context.commit("a", 0, OTHER, done("a", output="again")) is None
    assert await context.get(output_key("a")) == "theirs"


async def test_parallel_commits_of_one_run_both_land(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    left, right = runs.context(context.run_id), runs.context(context.run_id)
    assert (await left.claim("left", 0, OWNER, LEASE)).status is ClaimStatus.CLAIMED
    assert (await right.claim("right", 0, OTHER, LEASE)).status is ClaimStatus.CLAIMED
    results = await asyncio.gather(
        left.commit("left", 0, OWNER, [*done("left", output="L"),
                                       *(PatchOperation("set", f"l{k}", k) for k in range(4))]),
        right.commit("right", 0, OTHER, [*done("right", output="R"),
                                         *(PatchOperation("set", f"r{k}", k) for k in range(4))]))
    assert all(result is not None for result in results)
    data = await context.load()
    assert data is not None
    assert data[output_key("left")] == "L" and data[output_key("right")] == "R"
    assert all(data[f"l{k}"] == k and data[f"r{k}"] == k for k in range(4))
    # The commit that landed last saw both (the one that would start a join after them).
    assert any(output_key("left") in r and output_key("right") in r
               for r in results if r is not None)


# =============================================================================================
# release, renew, apply
# =============================================================================================


async def test_release_drops_only_our_lease_and_sets_the_attempt_count(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    await context.claim("a", 0, OWNER, LEASE)
    await context.claim("a", 0, OWNER, LEASE)  # attempts: 2
    await runs.context(context.run_id).release("a", OTHER, attempts=0)  # not the holder
    data = await context.load()
    assert data is not None and data[attempts_key("a")] == 2
    assert_lease(data, "a", OWNER, 0, LEASE)

    await context.release("a", OWNER)  # the count stays as it was
    data = await context.load()
    assert data is not None and lock_key("a") not in data and data[attempts_key("a")] == 2
    assert (await runs.context(context.run_id).claim("a", 0, OTHER, LEASE)).status is (
        ClaimStatus.CLAIMED)  # free for anyone now

    await context.claim("b", 0, OWNER, LEASE)
    await context.release("b", OWNER, attempts=5)
    await context.claim("c", 0, OWNER, LEASE)
    await context.release("c", OWNER, attempts=0)  # a refused job leaves nothing behind
    data = await context.load()
    assert data is not None
    assert lock_key("b") not in data and data[attempts_key("b")] == 5
    assert lock_key("c") not in data and attempts_key("c") not in data


async def test_renew_extends_only_our_lease(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    await context.claim("a", 0, OWNER, 2.0)
    assert await context.renew("a", OWNER, 120.0) is True
    data = await context.load()
    assert data is not None
    assert_lease(data, "a", OWNER, 0, 120.0)
    assert data[attempts_key("a")] == 1  # renewing is not an attempt
    other = runs.context(context.run_id)
    assert await other.renew("a", OTHER, 500.0) is False
    assert await other.renew("b", OWNER, 500.0) is False  # no lease on b at all
    data = await context.load()
    assert data is not None and lock_key("b") not in data
    assert_lease(data, "a", OWNER, 0, 120.0)
    await asyncio.sleep(2.2)  # outlived the first lease
    assert (await other.claim("a", 0, OTHER, LEASE)).status is ClaimStatus.LOCKED
    await context.release("a", OWNER)
    assert await context.renew("a", OWNER, LEASE) is False


async def test_apply_is_unconditional_and_returns_the_context(runs: RunStore) -> None:
    context = runs.context()
    await context.create({"a": 1, "b": 2})
    await context.claim("n", 0, OWNER, LEASE)
    applied = await runs.context(context.run_id).apply(
        [PatchOperation("set", "c", {"d": [3]}), PatchOperation("delete", "a"),
         PatchOperation("set", record_key("skipped"), {"n": 1, "skipped": True})])
    assert applied is not None and applied == await context.load()
    assert applied["b"] == 2 and applied["c"] == {"d": [3]} and "a" not in applied
    assert applied[record_key("skipped")] == {"n": 1, "skipped": True}
    assert_lease(applied, "n", OWNER, 0, LEASE)  # leases are not its business
    assert (await context.claim("skipped", 0, OTHER, LEASE)).status is ClaimStatus.DONE


async def test_concurrent_writers_of_one_run_lose_nothing(runs: RunStore) -> None:
    context = runs.context()
    await context.create({})
    writers = 8

    async def write(w: int) -> None:
        # Each writer has a context object of its own, as separate workers would.
        await runs.context(context.run_id).apply(
            [PatchOperation("set", f"w{w}.k{k}", [w, k]) for k in range(3)])

    await asyncio.gather(*(write(w) for w in range(writers)))
    assert await context.load() == {f"w{w}.k{k}": [w, k] for w in range(writers)
                                    for k in range(3)}


# =============================================================================================
# item size limits (DynamoDB 400 KB, Cosmos DB 2 MB)
# =============================================================================================


def check_too_large(error: ContextTooLargeError, runs: RunStore, run_id: str) -> None:
    assert runs.limit_bytes is not None and runs.service is not None
    message = str(error)
    assert run_id in message and str(error.size_bytes) in message and "bytes" in message
    assert runs.service in message
    assert error.size_bytes > runs.limit_bytes and error.limit_bytes == runs.limit_bytes
    assert error.run_id == run_id


async def test_a_context_over_the_item_limit_is_refused_at_create(
        limited_runs: RunStore) -> None:
    runs = limited_runs
    assert runs.limit_bytes is not None
    context = runs.context()
    with pytest.raises(ContextTooLargeError) as raised:
        await context.create({"blob": "x" * (runs.limit_bytes + 10)})
    check_too_large(raised.value, runs, context.run_id)
    assert await context.load() is None  # nothing stored

    # Just under the limit: stored whole, not truncated.
    almost = runs.context()
    blob = "z" * (runs.limit_bytes - 30_000)
    await almost.create({"blob": blob})
    assert await almost.get("blob") == blob


async def test_a_write_past_the_item_limit_is_refused_and_writes_nothing(
        limited_runs: RunStore) -> None:
    runs = limited_runs
    assert runs.limit_bytes is not None
    context = runs.context()
    await context.create({"small": "s"})
    with pytest.raises(ContextTooLargeError) as raised:
        await context.set("blob", "x" * (runs.limit_bytes + 10))
    check_too_large(raised.value, runs, context.run_id)
    assert await context.load() == {"small": "s"}

    # Growth across writes: each write fits, the item would not.
    half = "y" * (runs.limit_bytes // 2 + 1000)
    await context.set("first", half)
    with pytest.raises(ContextTooLargeError, match=context.run_id):
        await runs.context(context.run_id).set("second", half)
    assert not await context.has("second")

    # A commit too large for the item: refused whole, the lease still ours.
    assert (await context.claim("huge", 0, OWNER, LEASE)).status is ClaimStatus.CLAIMED
    with pytest.raises(ContextTooLargeError, match=context.run_id):
        await runs.context(context.run_id).commit("huge", 0, OWNER, done("huge", output=half))
    data = await context.load()
    assert data is not None and output_key("huge") not in data
    assert record_key("huge") not in data
    assert_lease(data, "huge", OWNER, 0, LEASE)
    assert await context.commit("huge", 0, OWNER, done("huge", output="small")) is not None
