"""A worker's copies of runs (:mod:`flowcraft.distributed.snapshots`): when a claim may be
answered from the copy instead of the stored run, and that runs claimed that way behave as
runs claimed the ordinary way."""

from __future__ import annotations

from typing import Any

from distributed_helpers import Cluster, Executions, comparable, meanwhile, oracle
from flowcraft import WorkflowBlueprint
from flowcraft.context import deep_copy_json
from flowcraft.core.graph import Graph
from flowcraft.core.routing import completed_record, record_key, skipped_record
from flowcraft.distributed.context import (
    RUN_STATE_KEY,
    InMemoryDistributedContext,
    InMemoryRunStore,
)
from flowcraft.distributed.job import JobPayload
from flowcraft.distributed.snapshots import RunSnapshots


def blueprint(nodes: list[str], edges: list[tuple[str, str]], **extra: Any) -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": "snap", "nodes": [{"id": node, "uses": "step"} for node in nodes],
        "edges": [{"source": s, "target": t, **extra.get(f"{s}->{t}", {})} for s, t in edges]})


def job(node_id: str, iteration: int = 0) -> JobPayload:
    return JobPayload("run-1", "snap", node_id, iteration)


FAN = blueprint(["s", "a", "b", "j"], [("s", "a"), ("s", "b"), ("a", "j"), ("b", "j")])


def test_a_copy_covers_a_node_whose_predecessors_it_shows_delivered() -> None:
    graph = Graph(FAN)
    snapshots = RunSnapshots()
    data: dict[str, Any] = {"user": [1, 2], "_outputs.s": {"x": 1},
                            record_key("s"): completed_record(0, [0, 1], None)}
    snapshots.keep("run-1", data)
    assert snapshots.covering(job("a"), graph) == data
    # Not a start node, not a join whose other predecessor the copy does not show, not an
    # iteration it cannot know, not a run it does not hold.
    assert snapshots.covering(job("s"), graph) is None
    assert snapshots.covering(job("j"), graph) is None
    assert snapshots.covering(job("a", 1), graph) is None
    assert snapshots.covering(JobPayload("run-2", "snap", "a", 0), graph) is None
    # Once both branches are in the copy, the join is covered; a branch that resolved is not.
    snapshots.keep("run-1", {**data, record_key("a"): completed_record(0, [0], None),
                             record_key("b"): completed_record(0, [0], None)})
    assert snapshots.covering(job("j"), graph) is not None
    assert snapshots.covering(job("a"), graph) is None


def test_no_copy_for_an_ended_run_a_loop_or_a_join_that_would_be_skipped() -> None:
    graph = Graph(FAN)
    snapshots = RunSnapshots()
    ended = {record_key("s"): completed_record(0, [0, 1], None),
             RUN_STATE_KEY: {"status": "cancelled"}}
    snapshots.keep("run-1", ended)
    assert snapshots.covering(job("a"), graph) is None
    snapshots.keep("run-1", {record_key("s"): completed_record(0, [0, 1], None),
                             record_key("a"): skipped_record(0),
                             record_key("b"): skipped_record(0)})
    assert snapshots.covering(job("j"), graph) is None  # skipped, not run
    loop = Graph(blueprint(["s", "a", "b"], [("s", "a"), ("a", "b"), ("b", "a")],
                           **{"b->a": {"condition": "false"}}))
    snapshots.keep("run-1", {record_key("s"): completed_record(0, [0], None)})
    assert snapshots.covering(job("a"), loop) is None


def test_copies_are_independent_of_the_run_they_were_kept_from_and_of_each_other() -> None:
    graph = Graph(FAN)
    snapshots = RunSnapshots(limit=2)
    data: dict[str, Any] = {"nested": {"list": [1]}, "_outputs.s": [1],
                            record_key("s"): completed_record(0, [0, 1], None)}
    snapshots.keep("run-1", data)
    data["nested"]["list"].append(2)  # the node that kept it goes on changing its dict
    first = snapshots.covering(job("a"), graph)
    assert first is not None and first["nested"] == {"list": [1]}
    first["_outputs.s"].append(99)  # the node that got the copy changes its input in place
    second = snapshots.covering(job("b"), graph)
    assert second is not None and second["_outputs.s"] == [1]
    nested = {"a": [{"b": 1}], "t": ({"c": 2},)}
    copied = deep_copy_json(nested)
    assert copied == nested and copied["a"][0] is not nested["a"][0]
    assert copied["t"][0] is not nested["t"][0]
    # Only the most recent runs are kept.
    snapshots.keep("run-2", data)
    snapshots.keep("run-3", data)
    assert snapshots.covering(job("a"), graph) is None


async def test_a_fan_claimed_from_copies_matches_the_in_memory_run() -> None:
    """One worker runs a fan: after the source's commit, the branches and the join are
    claimed from its copy of the run (no read of the run per claim), with the same result."""
    runs = Executions()
    width = 6
    bp = WorkflowBlueprint.model_validate({
        "id": "copied", "nodes": [{"id": "s", "uses": "step"},
                                  *({"id": f"b{i}", "uses": "step"} for i in range(width)),
                                  {"id": "j", "uses": "step"}],
        "edges": [*({"source": "s", "target": f"b{i}"} for i in range(width)),
                  *({"source": f"b{i}", "target": "j"} for i in range(width))]})
    registry = {"step": runs.node(lambda ctx: [ctx.node_id, ctx.input])}
    expected = await oracle(bp, registry, {"user": "u"}, run_id="copied-1")
    runs.reset()
    store = _RecordingStore()
    async with Cluster([bp], registry, workers=1, store=store) as cluster:
        result = await cluster.run(bp, {"user": "u"}, run_id="copied-1")
        await cluster.settle()
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    # Only the start node was claimed by reading the run: the branches and the join were
    # claimed from this worker's copy (the last branch's commit read the run to decide the
    # join, and kept it).
    assert store.plain_claims == ["s"], store.plain_claims
    assert "j" in store.from_copies and len(store.from_copies) >= 2, store.from_copies


async def test_without_lean_writes_every_claim_and_commit_reads_back_and_arrivals_count() -> None:
    """``lean_writes=False``, for a deployment that still has workers which do not count join
    arrivals: no claim or commit is answered from a copy, and arrivals are counted anyway,
    so the workers can turn it on once all of them are new."""
    from flowcraft.distributed.context import arrivals_key

    runs = Executions()
    bp = WorkflowBlueprint.model_validate({
        "id": "plain", "nodes": [{"id": "s", "uses": "step"}, {"id": "a", "uses": "step"},
                                 {"id": "b", "uses": "step"}, {"id": "j", "uses": "step"}],
        "edges": [{"source": "s", "target": "a"}, {"source": "s", "target": "b"},
                  {"source": "a", "target": "j"}, {"source": "b", "target": "j"}]})
    store = _RecordingStore()
    async with Cluster([bp], {"step": runs.node()}, workers=2, store=store,
                       lean_writes=False) as cluster:
        assert all(not worker.lean_writes for worker in cluster.workers)
        result = await cluster.run(bp, run_id="plain-1")
        await cluster.settle()
    assert result.status == "completed"
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    assert store.from_copies == [] and store.lean_commits == 0
    assert store.items["plain-1"][arrivals_key("j")] == 2


class _RecordingStore(InMemoryRunStore):
    """Notes the nodes whose claims came with a copy of the run (alone or together)."""

    def __init__(self) -> None:
        super().__init__()
        self.from_copies: list[str] = []
        self.plain_claims: list[str] = []
        self.lean_commits = 0

    def context(self, run_id: str) -> InMemoryDistributedContext:
        store = self

        class Context(InMemoryDistributedContext):
            async def claim(self, node_id: str, *args: Any, **kwargs: Any) -> Any:
                copied = kwargs.get("base") is not None
                (store.from_copies if copied else store.plain_claims).append(node_id)
                return await super().claim(node_id, *args, **kwargs)

            async def claim_together(self, claims: Any, *args: Any) -> Any:
                store.from_copies.extend(node_id for node_id, _, _ in claims)  # all copied
                return await super().claim_together(claims, *args)

            async def commit(self, *args: Any, **kwargs: Any) -> Any:
                store.lean_commits += kwargs.get("base") is not None
                return await super().commit(*args, **kwargs)

        return Context(self, run_id)


# -- states a node reaches without a record: the store, not the copy, must refuse -------------


async def test_a_duplicate_of_a_parked_node_is_not_run_again_from_a_copy() -> None:
    """The worker's copy predates the park (a park writes no record and is no commit of the
    copy's): the duplicate's claim must still see the node awaiting and drop the job."""
    from flowcraft.core.routing import AWAITING_DETAILS_KEY
    from flowcraft.nodes.base import AwaitingSignal

    runs: list[str] = []

    async def pre(ctx: Any) -> Any:
        return 1

    async def hook(ctx: Any) -> Any:
        runs.append(ctx.node_id)
        raise AwaitingSignal({"reason": "webhook", "token": f"t{len(runs)}"})

    bp = WorkflowBlueprint.model_validate({
        "id": "parks", "nodes": [{"id": "pre", "uses": "pre"}, {"id": "w", "uses": "hook"}],
        "edges": [{"source": "pre", "target": "w"}]})
    async with Cluster([bp], {"pre": pre, "hook": hook}, workers=1, start=False) as cluster:
        algorithm = cluster.workers[0].algorithm
        run_id = await cluster.client.start_workflow(bp, {}, run_id="parks-1")
        await algorithm.handle_job(JobPayload(run_id, bp.id, "pre", 0))  # runs w, which parks
        assert runs == ["w"]
        await algorithm.handle_job(JobPayload(run_id, bp.id, "w", 0))  # a duplicate
        assert runs == ["w"]
        details = cluster.store.items[run_id][AWAITING_DETAILS_KEY]["w"]
        assert details["token"] == "t1"


async def test_a_scatter_job_sent_again_while_its_map_runs_does_not_restart_the_map() -> None:
    from flowcraft import Flow
    from flowcraft.distributed.context import map_key

    async def pre(ctx: Any) -> Any:
        return ctx.input

    async def item(ctx: Any) -> Any:
        return ctx.input

    async def after(ctx: Any) -> Any:
        return len(ctx.input)

    flow = (Flow("maps").node("pre", pre).batch("fan", item, input_key="items",
                                                 output_key="results")
            .node("after", after).edge("pre", "fan").edge("fan", "after"))
    bp = flow.to_blueprint()
    async with Cluster([bp], flow.registry(), workers=1, start=False, map_chunk_items=5,
                       map_ledger_min_items=2) as cluster:
        algorithm = cluster.workers[0].algorithm
        run_id = await cluster.client.start_workflow(bp, {"items": list(range(20))},
                                                     run_id="maps-1")
        await algorithm.handle_job(JobPayload(run_id, bp.id, "pre", 0))  # starts the map
        marker = cluster.store.items[run_id][map_key("fan_scatter")]
        # As reconcile sends it, or a redelivery after a crash between marker and sends.
        await algorithm.handle_job(JobPayload(run_id, bp.id, "fan_scatter", 0))
        assert cluster.store.items[run_id][map_key("fan_scatter")]["token"] == marker["token"]
        assert len([key for key in cluster.store.items if "~map~" in key]) == 4


async def test_an_any_join_takes_its_first_arrival_even_when_the_copy_lacks_it() -> None:
    """X commits ``a``; Y commits ``b`` and wins the join's first arrival; X's copy does not
    show ``b``, so X must claim the join the ordinary way to hand it ``b``'s output."""
    from flowcraft.distributed.coordination import any_key

    seen: dict[str, Any] = {}

    async def step(ctx: Any) -> Any:
        seen[ctx.node_id] = ctx.input
        return f"out-{ctx.node_id}"

    bp = WorkflowBlueprint.model_validate({
        "id": "first", "nodes": [{"id": "s", "uses": "step"}, {"id": "a", "uses": "step"},
                                 {"id": "b", "uses": "step"},
                                 {"id": "j", "uses": "step", "config": {"joinStrategy": "any"}}],
        "edges": [{"source": "s", "target": "a"}, {"source": "s", "target": "b"},
                  {"source": "a", "target": "j"}, {"source": "b", "target": "j"}]})
    async with Cluster([bp], {"step": step}, workers=2, start=False,
                       local_continuation=False) as cluster:
        x, y = cluster.workers[0].algorithm, cluster.workers[1].algorithm
        run_id = await cluster.client.start_workflow(bp, {}, run_id="first-1")
        await x.handle_job(JobPayload(run_id, bp.id, "s", 0))
        async with meanwhile(x, "after_commit", "a",
                             lambda: y.handle_job(JobPayload(run_id, bp.id, "b", 0))):
            await x.handle_job(JobPayload(run_id, bp.id, "a", 0))
        assert await cluster.coordination.get(any_key(run_id, "j", 0)) == "b"
        await x.handle_job(JobPayload(run_id, bp.id, "j", 0))
        assert seen["j"] == "out-b"
