"""Claims from copies that jobs of one run make at the same moment go out as one write
(:mod:`flowcraft.distributed.claims`).

Here: a fan's branches received together are claimed in fewer writes than there are
branches, each still runs once and the run ends as in memory (also under duplicated,
shuffled delivery on three workers); a batch that one claim would spoil is claimed one
by one; and a job cancelled while its claim waited gives the lease back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from distributed_helpers import Cluster, Executions, comparable, oracle
from flowcraft import PatchOperation, WorkflowBlueprint
from flowcraft.core.routing import record_key
from flowcraft.distributed.claims import ClaimBatcher
from flowcraft.distributed.context import ClaimStatus, InMemoryRunStore, attempts_key, lock_key
from flowcraft.distributed.homes import run_context

WIDTH = 12


def fan(width: int = WIDTH) -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": "fan", "nodes": [{"id": "s", "uses": "step"},
                               *({"id": f"b{i}", "uses": "step"} for i in range(width)),
                               {"id": "j", "uses": "step"}],
        "edges": [*({"source": "s", "target": f"b{i}"} for i in range(width)),
                  *({"source": f"b{i}", "target": "j"} for i in range(width))]})


async def test_branches_received_together_are_claimed_in_fewer_writes() -> None:
    runs = Executions()
    bp = fan()
    registry = {"step": runs.node()}
    expected = await oracle(bp, registry, run_id="batched")
    runs.reset()
    async with Cluster([bp], registry, workers=1, concurrency=4) as cluster:
        result = await cluster.run(bp, run_id="batched")
        await cluster.settle()
        claims = cluster.store.calls.get("claim", 0)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    # The source's commit claims the branches of its own and 3 lent job slots; the other 8
    # were claimed from the copy as they came in, 4 at a time: the start node, 2 batches
    # and the join (one by one, they were 10 claims).
    assert claims <= 5, claims


async def test_batched_claims_run_each_node_once_under_duplicated_shuffled_delivery() -> None:
    runs = Executions()
    bp = fan()
    registry = {"step": runs.node()}
    expected = await oracle(bp, registry, run_id="batched-dup")
    runs.reset()
    async with Cluster([bp], registry, workers=3, concurrency=8, duplicate=True,
                       shuffle=True, seed=11) as cluster:
        result = await cluster.run(bp, run_id="batched-dup")
        await cluster.settle()
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}


async def test_a_batch_one_claim_would_spoil_is_claimed_one_by_one() -> None:
    store = InMemoryRunStore()
    context = run_context(store, "spoiled")
    await context.create({})
    await context.apply([PatchOperation("set", record_key("done"), {"n": 1, "taken": []})])
    batcher = ClaimBatcher()
    base: dict[str, Any] = {"copied": True}
    fresh, done = await asyncio.gather(
        batcher.claim(run_context(store, "spoiled"), "fresh", 0, "w/1", 30, base),
        batcher.claim(run_context(store, "spoiled"), "done", 0, "w/2", 30, base))
    assert fresh.status is ClaimStatus.CLAIMED and fresh.data is not None
    assert fresh.data["copied"] is True and fresh.data[attempts_key("fresh")] == 1
    assert done.status is ClaimStatus.DONE
    assert store.calls["claim"] == 3  # the batch, refused; then one claim each


async def test_a_job_cancelled_while_its_claim_waited_gives_the_lease_back() -> None:
    store = InMemoryRunStore()
    await run_context(store, "stopping").create({})
    batcher = ClaimBatcher()
    base: dict[str, Any] = {}
    kept = asyncio.ensure_future(
        batcher.claim(run_context(store, "stopping"), "a", 0, "w/1", 30, base))
    dropped = asyncio.ensure_future(
        batcher.claim(run_context(store, "stopping"), "b", 0, "w/2", 30, base))
    await asyncio.sleep(0)  # both wait for the batch
    dropped.cancel()
    claim = await kept
    assert claim.status is ClaimStatus.CLAIMED
    for _ in range(5):
        await asyncio.sleep(0)  # the release of b's lease
    stored = store.items["stopping"]
    assert lock_key("a") in stored and lock_key("b") not in stored
    assert attempts_key("b") not in stored
