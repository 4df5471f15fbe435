"""The one successor decision (flowcraft.core.successors), tested as a pure function.

Records are written by hand here, as an engine would write them; the tests then ask what
follows. The properties run random DAGs with random routing to completion in three ways —
incrementally with the in-memory join tally, incrementally from the records alone (what a
worker does), and by restarting from :func:`frontier` at a random point (crash recovery) —
and require the same nodes to run and be skipped, with nothing left over.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcraft import WorkflowBlueprint
from flowcraft.core.graph import Graph
from flowcraft.core.routing import (
    completed_record,
    read_record,
    record_key,
    resolution_count,
    skipped_record,
)
from flowcraft.core.successors import JoinDecision, JoinTally, decide, evaluate, frontier


def graph(nodes: list[Any], edges: list[Any]) -> Graph:
    return Graph(WorkflowBlueprint.model_validate({
        "id": "g",
        "nodes": [n if isinstance(n, dict) else {"id": n, "uses": "x"} for n in nodes],
        "edges": [e if isinstance(e, dict) else {"source": e[0], "target": e[1]} for e in edges],
    }))


def done(data: dict[str, Any], g: Graph, node: str, *targets: str) -> None:
    """Record ``node`` as completed, having taken the edges to ``targets``."""
    taken = [i for i, e in enumerate(g.outgoing[node]) if e.target in targets]
    data[record_key(node)] = completed_record(resolution_count(data, node), taken, None)


def skip(data: dict[str, Any], node: str) -> None:
    data[record_key(node)] = skipped_record(resolution_count(data, node))


def ready_ids(decision: Any) -> list[str]:
    return [r.node_id for r in decision.ready]


def test_a_chain_runs_its_next_node_and_says_it_is_certain() -> None:
    g = graph(["a", "b", "c"], [("a", "b"), ("b", "c")])
    data: dict[str, Any] = {}
    done(data, g, "a", "b")
    decision = decide(g, data, ["a"])
    assert ready_ids(decision) == ["b"]
    assert decision.ready[0].certain and decision.ready[0].generation == 0
    assert decision.skip == []


def test_a_branch_not_taken_is_skipped_and_the_skip_is_certain() -> None:
    g = graph(["a", "yes", "no", "after_no"], [("a", "yes"), ("a", "no"), ("no", "after_no")])
    data: dict[str, Any] = {}
    done(data, g, "a", "yes")
    decision = decide(g, data, ["a"])
    assert ready_ids(decision) == ["yes"]
    assert decision.skip == ["no"] and decision.certain_skips == ["no"]
    skip(data, "no")
    assert decide(g, data, ["no"]).skip == ["after_no"]  # the skip propagates


def test_an_all_join_waits_for_every_predecessor_then_runs_if_one_delivered() -> None:
    g = graph(["a", "b", "c", "j"], [("a", "b"), ("a", "c"), ("b", "j"), ("c", "j")])
    data: dict[str, Any] = {}
    done(data, g, "a", "b", "c")
    done(data, g, "b", "j")
    assert decide(g, data, ["b"]).ready == []
    skip(data, "c")
    decision = decide(g, data, ["c"])
    assert ready_ids(decision) == ["j"]
    assert not decision.ready[0].certain  # another predecessor could have changed it
    assert not decision.ready[0].delivered  # c was skipped: b delivered


def test_an_all_join_is_skipped_when_no_predecessor_delivered() -> None:
    g = graph(["b", "c", "j"], [("b", "j"), ("c", "j")])
    data: dict[str, Any] = {}
    skip(data, "b")
    skip(data, "c")
    decision = decide(g, data, ["c"])
    assert decision.skip == ["j"] and decision.certain_skips == []


def test_an_any_join_runs_on_the_first_delivery_and_never_again() -> None:
    g = graph(["b", "c", {"id": "j", "uses": "x", "config": {"joinStrategy": "any"}}],
              [("b", "j"), ("c", "j")])
    data: dict[str, Any] = {}
    done(data, g, "b", "j")
    decision = decide(g, data, ["b"])
    assert ready_ids(decision) == ["j"] and decision.ready[0].delivered
    done(data, g, "j")
    done(data, g, "c", "j")
    assert decide(g, data, ["c"]).ready == []  # late arrival: j resolved already


def loop_graph() -> Graph:
    """entry -> head -> body -> ctl; ctl -> head (back edge, "continue"), ctl -> out."""
    return graph(
        ["entry", "head", "body", {"id": "ctl", "uses": "loop-controller"}, "out"],
        [("entry", "head"), ("head", "body"), ("body", "ctl"),
         {"source": "ctl", "target": "head", "action": "continue"},
         {"source": "ctl", "target": "out", "action": "break"}])


def test_a_back_edge_starts_the_next_iteration() -> None:
    g = loop_graph()
    data: dict[str, Any] = {}
    for node, target in [("entry", "head"), ("head", "body"), ("body", "ctl")]:
        done(data, g, node, target)
    done(data, g, "ctl", "head")
    decision = decide(g, data, ["ctl"])
    assert [(r.node_id, r.generation) for r in decision.ready] == [("head", 1)]
    assert decision.skip == ["out"]  # not taken on this iteration


def test_a_redelivered_loop_entry_does_not_start_the_loop_again() -> None:
    """A duplicate job of the node before a loop re-announces its successors; the loop head
    ran already, and only the loop itself may bring it round again."""
    g = loop_graph()
    data: dict[str, Any] = {}
    for node, target in [("entry", "head"), ("head", "body")]:
        done(data, g, node, target)
    assert decide(g, data, ["entry"]).ready == []
    assert evaluate(g, data, "head") is JoinDecision.WAIT


def test_a_stale_back_edge_delivery_starts_nothing() -> None:
    g = loop_graph()
    data: dict[str, Any] = {}
    for node, target in [("entry", "head"), ("head", "body"), ("body", "ctl")]:
        done(data, g, node, target)
    done(data, g, "ctl", "head")
    done(data, g, "head", "body")  # iteration 2 is under way
    assert decide(g, data, ["ctl"]).ready == []


def test_a_node_skipped_by_a_loop_is_revived_when_the_loop_exits_to_it() -> None:
    g = loop_graph()
    data: dict[str, Any] = {}
    for node, target in [("entry", "head"), ("head", "body"), ("body", "ctl")]:
        done(data, g, node, target)
    done(data, g, "ctl", "head")
    skip(data, "out")
    done(data, g, "head", "body")
    done(data, g, "body", "ctl")
    done(data, g, "ctl", "out")
    decision = decide(g, data, ["ctl"])
    assert [(r.node_id, r.generation) for r in decision.ready] == [("out", 1)]
    assert not decision.ready[0].certain  # resolved before: no claim in the commit
    assert [r.node_id for r in frontier(g, data).ready] == ["out"]


def test_a_failed_node_resolves_nothing() -> None:
    g = graph(["a", "b"], [("a", "b")])
    data: dict[str, Any] = {record_key("a"): {"n": 1, "failed": True, "error": "x"}}
    assert decide(g, data, ["a"]).ready == [] and frontier(g, data).ready == []


def test_the_frontier_leaves_out_awaiting_nodes() -> None:
    g = graph(["a", "b", "c"], [("a", "b"), ("a", "c")])
    data: dict[str, Any] = {"_awaitingNodeIds": ["b"]}
    assert ready_ids(frontier(g, data)) == ["a"]
    done(data, g, "a", "b", "c")
    assert ready_ids(frontier(g, data)) == ["c"]


# -- properties -------------------------------------------------------------------------------

PROPERTIES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def routed_dags(draw: st.DrawFn) -> tuple[Graph, dict[str, frozenset[str]]]:
    """A random DAG (indices are a topological order), random joins, and for each node the
    successors its run delivers to."""
    count = draw(st.integers(1, 18))
    pairs = draw(st.lists(st.tuples(st.integers(0, count - 1), st.integers(0, count - 1)),
                          max_size=count * 3))
    edges = sorted({(min(a, b), max(a, b)) for a, b in pairs if a != b})
    nodes = [{"id": f"n{i}", "uses": "x",
              "config": {"joinStrategy": draw(st.sampled_from(["all", "any"]))}}
             for i in range(count)]
    g = graph(nodes, [(f"n{a}", f"n{b}") for a, b in edges])
    takes = {
        f"n{i}": frozenset(f"n{b}" for a, b in edges if a == i and draw(st.booleans()))
        for i in range(count)
    }
    return g, takes


def run_to_the_end(g: Graph, takes: dict[str, frozenset[str]], data: dict[str, Any],
                   ready: list[str], skips: list[str], tally: JoinTally | None,
                   order: random.Random, crash_after: int | None = None) -> int:
    """Apply decisions until nothing is ready: run ready nodes in a random order, write skips
    as they come. Returns how many nodes ran; stops early after ``crash_after`` runs."""
    ran = 0
    pending = list(dict.fromkeys(ready))
    queue = list(skips)
    while pending or queue:
        if queue:
            node = queue.pop(0)
            if read_record(data, node) is not None:
                continue
            skip(data, node)
            decision = decide(g, data, [node], tally)
        else:
            node = pending.pop(order.randrange(len(pending)))
            if read_record(data, node) is not None:
                continue  # decided twice (an any join): runs once
            if crash_after is not None and ran >= crash_after:
                return ran
            done(data, g, node, *takes[node])
            ran += 1
            decision = decide(g, data, [node], tally)
        pending += [r.node_id for r in decision.ready if r.node_id not in pending]
        queue += decision.skip
    return ran


@PROPERTIES
@given(dag=routed_dags(), seed=st.integers(0, 2**16))
def test_the_tally_never_changes_a_decision(dag: tuple[Graph, dict[str, frozenset[str]]],
                                            seed: int) -> None:
    g, takes = dag
    with_tally: dict[str, Any] = {}
    from_records: dict[str, Any] = {}
    run_to_the_end(g, takes, with_tally, g.start_node_ids, [], JoinTally(), random.Random(seed))
    run_to_the_end(g, takes, from_records, g.start_node_ids, [], None, random.Random(seed))
    assert with_tally == from_records
    # Every node resolved (ran or was skipped): routing never stalls.
    assert all(read_record(with_tally, n) is not None for n in g.nodes)
    assert frontier(g, with_tally).ready == [] and frontier(g, with_tally).skip == []


@PROPERTIES
@given(dag=routed_dags(), seed=st.integers(0, 2**16), crash=st.integers(0, 20))
def test_continuing_from_the_frontier_after_a_crash_ends_the_same(
    dag: tuple[Graph, dict[str, frozenset[str]]], seed: int, crash: int,
) -> None:
    g, takes = dag
    reference: dict[str, Any] = {}
    run_to_the_end(g, takes, reference, g.start_node_ids, [], JoinTally(), random.Random(seed))
    data: dict[str, Any] = {}
    run_to_the_end(g, takes, data, g.start_node_ids, [], JoinTally(), random.Random(seed),
                   crash_after=crash)
    # The messages in flight are lost; what follows comes from the records alone.
    again = frontier(g, data)
    run_to_the_end(g, takes, data, [r.node_id for r in again.ready], again.skip, None,
                   random.Random(seed + 1))
    ran = {n for n in g.nodes if not read_record(data, n).skipped}  # type: ignore[union-attr]
    assert ran == {n for n in g.nodes if not read_record(reference, n).skipped}  # type: ignore[union-attr]
