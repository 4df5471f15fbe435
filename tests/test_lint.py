"""``lint_blueprint``: one test per issue code, and a clean blueprint has no issues."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flowcraft import BlueprintValidationError, Flow, LintIssue, WorkflowBlueprint, lint_blueprint


def noop(ctx: Any) -> None:
    return None


REGISTRY = {"work": noop, "spare": noop}


def codes(issues: list[LintIssue]) -> list[tuple[str, str | None, int | None]]:
    return [(issue.code, issue.node_id, issue.edge_index) for issue in issues]


def test_a_sound_blueprint_has_no_issues() -> None:
    flow = (
        Flow("sound")
        .node("fetch", noop, fallback="spare")
        .batch("resize", noop, input_key="items", output_key="sizes")
        .subflow("child", "other")
        .node("poll", noop)
        .loop("again", start_node_id="poll", end_node_id="poll", condition="false")
        .edge("fetch", "resize")
        .edge("resize", "child")
        .edge("child", "poll")
    )

    registry = {**flow.registry(), **REGISTRY}
    assert lint_blueprint(flow.to_blueprint(), registry, blueprints={"other"}) == []


def test_missing_implementations_are_reported_per_node() -> None:
    raw = {"id": "bp", "nodes": [
        {"id": "a", "uses": "work", "config": {"fallback": "nowhere"}},
        {"id": "b", "uses": "unknown"},
        {"id": "c", "uses": "wait"},                          # built in: known
        {"id": "d", "uses": "work", "config": {"fallback": "e"}},
        {"id": "e", "uses": "missing-too"},                    # a fallback node without code
    ], "edges": [{"source": "a", "target": "b"}, {"source": "b", "target": "c"},
                 {"source": "c", "target": "d"}]}

    issues = lint_blueprint(raw, REGISTRY)

    assert codes(issues) == [
        ("MISSING_FALLBACK_IMPLEMENTATION", "a", None),
        ("MISSING_NODE_IMPLEMENTATION", "b", None),
        ("MISSING_FALLBACK_IMPLEMENTATION", "d", None),
        ("MISSING_NODE_IMPLEMENTATION", "e", None),
    ]
    assert issues[1].message == "node 'b': no implementation registered for uses 'unknown'"
    assert issues[1].to_dict() == {"code": "MISSING_NODE_IMPLEMENTATION",
                                   "message": issues[1].message, "nodeId": "b"}


def test_a_batch_worker_key_nothing_implements_is_reported() -> None:
    raw = {"id": "bp", "nodes": [
        {"id": "s", "uses": "batch-scatter",
         "params": {"workerUsesKey": "resize", "gatherNodeId": "g"}},
        {"id": "t", "uses": "batch-scatter", "params": {"gatherNodeId": "g"}},
        {"id": "g", "uses": "batch-gather", "params": {"gatherNodeId": "g"}},
    ], "edges": [{"source": "s", "target": "g"}, {"source": "t", "target": "g"}]}

    issues = lint_blueprint(raw, REGISTRY)

    assert codes(issues) == [("INVALID_BATCH_WORKER_KEY", "s", None),
                             ("INVALID_BATCH_WORKER_KEY", "t", None)]
    assert "workerUsesKey 'resize'" in issues[0].message
    assert "needs a 'workerUsesKey'" in issues[1].message


def test_unknown_subflow_blueprint_ids_are_reported_when_the_blueprints_are_known() -> None:
    raw = {"id": "bp", "nodes": [
        {"id": "known", "uses": "subflow", "params": {"blueprintId": "child"}},
        {"id": "unknown", "uses": "subflow", "params": {"blueprintId": "ghost"}},
        {"id": "none", "uses": "subflow"},
    ], "edges": [{"source": "known", "target": "unknown"}, {"source": "unknown", "target": "none"}]}

    assert codes(lint_blueprint(raw, REGISTRY)) == [("INVALID_SUBFLOW_BLUEPRINT_ID", "none", None)]
    issues = lint_blueprint(raw, REGISTRY, blueprints={"child": object()})
    assert codes(issues) == [("INVALID_SUBFLOW_BLUEPRINT_ID", "unknown", None),
                             ("INVALID_SUBFLOW_BLUEPRINT_ID", "none", None)]
    assert issues[0].message == (
        "node 'unknown': subflow blueprint 'ghost' is not among the known blueprints (child)")


def test_edges_from_or_to_unknown_nodes_are_issues_not_exceptions() -> None:
    raw = {"id": "bp", "nodes": [{"id": "a", "uses": "work"}, {"id": "b", "uses": "work"}],
           "edges": [{"source": "a", "target": "b"}, {"source": "ghost", "target": "b"},
                     {"source": "a", "target": "nowhere"}]}
    with pytest.raises(BlueprintValidationError):  # validation refuses it at once
        WorkflowBlueprint.model_validate(raw)

    issues = lint_blueprint(raw, REGISTRY)

    assert codes(issues) == [("INVALID_EDGE_SOURCE", None, 1), ("INVALID_EDGE_TARGET", None, 2)]
    assert issues[0].message == (
        "edge #1 (ghost -> b): source 'ghost' is not a node of the blueprint")
    assert issues[0].to_dict()["edgeIndex"] == 1


def test_unreachable_nodes_are_orphans_but_fallback_only_nodes_are_not() -> None:
    raw = {"id": "bp", "nodes": [
        {"id": "a", "uses": "work", "config": {"fallback": "rescue"}},
        {"id": "rescue", "uses": "spare"},
        {"id": "x", "uses": "work"}, {"id": "y", "uses": "work"},  # a cycle nobody enters
    ], "edges": [{"source": "x", "target": "y"}, {"source": "y", "target": "x"}]}

    assert codes(lint_blueprint(raw, REGISTRY)) == [("ORPHAN_NODE", "x", None),
                                                    ("ORPHAN_NODE", "y", None)]


def test_a_loop_without_continue_and_other_validation_problems_are_reported() -> None:
    raw = {"id": "bp", "nodes": [
        {"id": "a", "uses": "work"},
        {"id": "ctl", "uses": "loop-controller", "params": {"condition": "true"}},
        {"id": "a", "uses": "work", "config": {"maxRetries": 0}},
    ], "edges": [{"source": "a", "target": "ctl"}]}

    issues = lint_blueprint(raw, REGISTRY)

    assert codes(issues) == [("LOOP_WITHOUT_CONTINUE", "ctl", None),
                             ("INVALID_BLUEPRINT", None, None),
                             ("INVALID_BLUEPRINT", None, None)]
    assert [i.message for i in issues[1:]] == [
        "node 'a': duplicate node id",
        "node 'a': maxRetries is the total number of attempts and must be >= 1, not 0",
    ]


def test_a_blueprint_whose_items_do_not_parse_is_refused() -> None:
    with pytest.raises(BlueprintValidationError, match="field 'uses'"):
        lint_blueprint({"id": "bp", "nodes": [{"id": "a"}],
                        "edges": [{"source": "a", "target": "b"}]}, REGISTRY)


def test_cli_validate_reports_lint_issues_with_their_codes(tmp_path: Path) -> None:
    import subprocess
    import sys

    blueprint = {
        "id": "linted",
        "nodes": [{"id": "a", "uses": "x"}, {"id": "b", "uses": "x"}, {"id": "c", "uses": "x"},
                  {"id": "s", "uses": "subflow", "params": {"blueprintId": "nope"}}],
        "edges": [{"source": "a", "target": "b"}, {"source": "c", "target": "c"}],
    }
    (tmp_path / "linted.json").write_text(json.dumps(blueprint))
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "child.json").write_text(json.dumps(
        {"id": "child", "nodes": [{"id": "n", "uses": "x"}], "edges": []}))
    done = subprocess.run(
        [sys.executable, "-m", "flowcraft", "validate", str(tmp_path / "linted.json"),
         "--blueprints", str(tmp_path / "others")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "ORPHAN_NODE node 'c'" in done.stdout
    assert "INVALID_SUBFLOW_BLUEPRINT_ID node 's'" in done.stdout
    # Without --registry, nothing is reported as unimplemented.
    assert "MISSING_NODE_IMPLEMENTATION" not in done.stdout
