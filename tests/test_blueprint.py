"""Blueprints: loading TypeScript-written JSON, round-trips, validation, immutability."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flowcraft import (
    BlueprintValidationError,
    FlowcraftError,
    FlowRuntime,
    NodeResult,
    WorkflowBlueprint,
    load_blueprint,
    load_blueprints,
)
from flowcraft.blueprint import check_blueprint, check_registry
from flowcraft.cli import main
from flowcraft.runtime import NodeEngine, RuntimeOptions

FIXTURES = Path(__file__).parent / "fixtures" / "blueprints"


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(BlueprintValidationError) as info:
        WorkflowBlueprint.model_validate(raw)
    return info.value.problems


def one_problem_mentioning(problems: list[str], *words: str) -> str:
    matching = [p for p in problems if all(word in p for word in words)]
    assert len(matching) == 1, f"expected one problem naming {words}, got {problems}"
    return matching[0]


# -- loading the shapes the TypeScript library's docs show ----------------------------------


def test_load_blueprint_reads_typescript_json_unchanged() -> None:
    bp = load_blueprint(FIXTURES / "content-moderation.json")

    assert bp.id == "content-moderation"
    assert [n.id for n in bp.nodes] == [
        "check_for_pii", "check_for_spam", "triage_post", "redact_post_branch",
        "approve_post_branch", "final_log",
    ]
    pii = bp.node("check_for_pii")
    assert pii.uses == "llm-condition"
    assert pii.params is not None
    assert pii.params["inputs"] == {"userPost": "userPost"}  # params.inputs stays a param
    assert pii.inputs is None
    sub = bp.node("redact_post_branch").params
    assert sub == {
        "blueprintId": "redact-post",
        "inputs": {"userPost": "userPost", "userId": "userId"},
        "outputs": {"moderation_result": "redaction_summary"},
    }
    final = bp.node("final_log")
    assert final.config is not None
    assert final.config.join_strategy == "any"
    assert final.join_strategy == "any"
    assert bp.node("triage_post").join_strategy == "all"  # the default
    actions = {(e.source, e.target): e.action for e in bp.edges}
    assert actions[("triage_post", "redact_post_branch")] == "action_redact"
    assert actions[("check_for_pii", "triage_post")] is None


def test_unknown_extra_fields_are_tolerated_and_kept() -> None:
    bp = load_blueprint(FIXTURES / "content-moderation.json")
    written = bp.to_dict()

    assert written["description"].startswith("Written for the TypeScript library")
    spam = next(n for n in written["nodes"] if n["id"] == "check_for_spam")
    assert spam["ui"] == {"x": 120, "y": 40}
    labelled = next(e for e in written["edges"] if e["target"] == "approve_post_branch")
    assert labelled["label"] == "ok"


def test_metadata_cycle_entry_points_and_config_are_read() -> None:
    bp = load_blueprint(FIXTURES / "counter-cycle.json")

    assert bp.metadata is not None
    assert bp.metadata.cycle_entry_points == ["increment"]
    assert bp.version == "3"
    config = bp.node("increment").config
    assert config is not None
    assert (config.max_retries, config.retry_delay, config.timeout) == (2, 1, 1000)
    assert bp.node("check").inputs == "increment"
    assert bp.to_dict()["metadata"] == {
        "version": "3", "cycleEntryPoints": ["increment"], "owner": "team-a",
    }


def test_node_inputs_as_mapping_and_fallback_config_are_read() -> None:
    bp = load_blueprint(FIXTURES / "resilient.json")

    fetch = bp.node("fetch")
    assert fetch.inputs == {"url": "_request.url", "user": "userId"}
    assert fetch.config is not None
    assert fetch.config.fallback == "cached"
    assert fetch.config.join_strategy == "all"
    assert bp.edges[0].transform == "input.body"


def test_from_json_and_model_validate_agree() -> None:
    text = (FIXTURES / "resilient.json").read_text()

    assert WorkflowBlueprint.from_json(text) == WorkflowBlueprint.model_validate(json.loads(text))


def test_load_blueprints_keys_a_directory_by_id() -> None:
    loaded = load_blueprints(FIXTURES)

    assert set(loaded) >= {"content-moderation", "redact-post", "counter-cycle", "resilient"}
    assert all(bp.id == key for key, bp in loaded.items())


@pytest.mark.parametrize(
    "name", ["content-moderation", "redact-post", "counter-cycle", "resilient"]
)
def test_to_dict_round_trips_every_fixture(name: str) -> None:
    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    bp = WorkflowBlueprint.model_validate(raw)

    assert bp.to_dict() == raw
    assert WorkflowBlueprint.model_validate(bp.to_dict()) == bp
    assert WorkflowBlueprint.from_json(bp.to_json()) == bp


def test_to_dict_writes_camel_case_and_omits_unset_fields() -> None:
    bp = WorkflowBlueprint.model_validate({
        "id": "camel",
        "nodes": [
            {"id": "a", "uses": "x", "config": {"maxRetries": 3, "retryDelay": 10,
                                                "timeout": 50, "joinStrategy": "any"}},
            {"id": "b", "uses": "y"},
        ],
        "edges": [{"source": "a", "target": "b"}],
    })
    written = bp.to_dict()

    assert written["nodes"][0]["config"] == {
        "maxRetries": 3, "retryDelay": 10, "timeout": 50, "joinStrategy": "any",
    }
    assert written["nodes"][1] == {"id": "b", "uses": "y"}
    assert written["edges"] == [{"source": "a", "target": "b"}]
    assert "metadata" not in written
    # Python code reads snake_case attributes; the same model accepts snake_case input.
    config = bp.nodes[0].config
    assert config is not None and config.max_retries == 3
    snake = WorkflowBlueprint.model_validate({
        "id": "camel", "nodes": [{"id": "a", "uses": "x", "config": {"max_retries": 3}}],
    })
    assert snake.to_dict()["nodes"][0]["config"] == {"maxRetries": 3}


def test_null_values_inside_params_survive_the_round_trip() -> None:
    raw = {"id": "p", "nodes": [{"id": "a", "uses": "x", "params": {"k": None, "n": {"m": None}}}],
           "edges": []}

    assert WorkflowBlueprint.model_validate(raw).to_dict() == raw


# -- validation: every problem at once, each naming its node or edge -------------------------


def test_validation_reports_every_problem_at_once() -> None:
    problems = problems_of({
        "id": "broken",
        "nodes": [
            {"id": "a", "uses": "x"},
            {"id": "a", "uses": "x"},
            {"id": "", "uses": "x"},
            {"id": "j", "uses": "x", "config": {"joinStrategy": "some"}},
            {"id": "r", "uses": "x", "config": {"maxRetries": -1}},
            {"id": "t", "uses": "x", "config": {"timeout": -5, "retryDelay": -1}},
        ],
        "edges": [
            {"source": "a", "target": "ghost"},
            {"source": "phantom", "target": "j"},
        ],
    })

    assert "duplicate" in one_problem_mentioning(problems, "'a'", "duplicate")
    one_problem_mentioning(problems, "id is empty")
    one_problem_mentioning(problems, "'j'", "joinStrategy", "some")
    one_problem_mentioning(problems, "'r'", "maxRetries", "-1")
    one_problem_mentioning(problems, "'t'", "timeout")
    one_problem_mentioning(problems, "'t'", "retryDelay")
    one_problem_mentioning(problems, "a -> ghost", "ghost")
    one_problem_mentioning(problems, "phantom -> j", "phantom")
    assert len(problems) == 8


def test_validation_error_is_a_flowcraft_error_and_a_value_error() -> None:
    with pytest.raises(BlueprintValidationError) as info:
        WorkflowBlueprint.model_validate({"id": "x", "nodes": [{"id": "a", "uses": "u"}],
                                          "edges": [{"source": "a", "target": "b"}]})
    assert isinstance(info.value, FlowcraftError)
    assert isinstance(info.value, ValueError)
    assert info.value.blueprint_id == "x"
    assert "a -> b" in str(info.value)


def test_field_errors_and_graph_problems_are_reported_together() -> None:
    problems = problems_of({
        "id": "mixed",
        "nodes": [
            {"id": "a"},  # no uses
            {"id": "b", "uses": "x", "config": {"maxRetries": "many"}},
            {"id": "c", "uses": "x"},
            {"id": "c", "uses": "x"},
        ],
        "edges": [{"source": "c", "target": "nowhere"}],
    })

    one_problem_mentioning(problems, "'a'", "uses")
    one_problem_mentioning(problems, "'b'", "maxRetries")
    one_problem_mentioning(problems, "'c'", "duplicate")
    one_problem_mentioning(problems, "c -> nowhere", "nowhere")


def test_empty_blueprint_id_and_bad_cycle_entry_point_are_reported() -> None:
    problems = problems_of({"id": "", "nodes": [{"id": "a", "uses": "x"}],
                            "metadata": {"cycleEntryPoints": ["zz"]}})

    one_problem_mentioning(problems, "blueprint id is empty")
    one_problem_mentioning(problems, "cycleEntryPoints", "zz")


def test_invalid_json_text_is_a_validation_error() -> None:
    with pytest.raises(BlueprintValidationError, match="not valid JSON"):
        WorkflowBlueprint.from_json("{nope")


def test_load_blueprint_names_the_file_when_it_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(BlueprintValidationError, match="cannot read"):
        load_blueprint(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"nodes": [{"id": "a", "uses": ""}]}))
    with pytest.raises(BlueprintValidationError) as info:
        load_blueprint(bad)
    assert info.value.blueprint_id == "bad.json"


def test_check_registry_reports_unknown_uses_and_fallbacks_together() -> None:
    bp = WorkflowBlueprint.model_validate({
        "id": "reg",
        "nodes": [
            {"id": "a", "uses": "known", "config": {"fallback": "nobody"}},
            {"id": "b", "uses": "unknown"},
            {"id": "c", "uses": "known", "config": {"fallback": "a"}},  # a node id works
        ],
    })
    with pytest.raises(BlueprintValidationError) as info:
        check_registry(bp, {"known": object()})

    problems = info.value.problems
    assert len(problems) == 2
    one_problem_mentioning(problems, "'a'", "fallback", "nobody")
    one_problem_mentioning(problems, "'b'", "unknown")


# -- registry problems surface when a run starts, before any node runs -----------------------


async def test_unknown_uses_raises_at_run_start_before_any_node_runs() -> None:
    ran: list[str] = []

    async def record(ctx: Any) -> None:
        ran.append(ctx.node_id)

    bp = WorkflowBlueprint.model_validate({
        "id": "unknown-uses",
        "nodes": [{"id": "first", "uses": "record"}, {"id": "second", "uses": "missing"}],
        "edges": [{"source": "first", "target": "second"}],
    })
    runtime = FlowRuntime(registry={"record": record})

    with pytest.raises(BlueprintValidationError) as info:
        await runtime.run(bp)
    assert ran == []
    one_problem_mentioning(info.value.problems, "'second'", "missing")


async def test_unknown_fallback_raises_at_run_start_before_any_node_runs() -> None:
    ran: list[str] = []

    async def record(ctx: Any) -> None:
        ran.append(ctx.node_id)

    bp = WorkflowBlueprint.model_validate({
        "id": "unknown-fallback",
        "nodes": [{"id": "first", "uses": "record", "config": {"fallback": "rescue"}}],
    })

    with pytest.raises(BlueprintValidationError) as info:
        await FlowRuntime(registry={"record": record}).run(bp)
    assert ran == []
    one_problem_mentioning(info.value.problems, "'first'", "rescue")


async def test_unknown_batch_worker_raises_at_run_start_before_any_node_runs() -> None:
    ran: list[str] = []

    async def record(ctx: Any) -> list[int]:
        ran.append(ctx.node_id)
        return [1, 2]

    bp = WorkflowBlueprint.model_validate({
        "id": "unknown-worker",
        "nodes": [
            {"id": "load", "uses": "record"},
            {"id": "fan", "uses": "batch-scatter", "inputs": "load",
             "params": {"workerUsesKey": "no-such-worker", "gatherNodeId": "gather"}},
            {"id": "gather", "uses": "batch-gather", "params": {"gatherNodeId": "gather"}},
        ],
        "edges": [{"source": "load", "target": "fan"}, {"source": "fan", "target": "gather"}],
    })

    with pytest.raises(BlueprintValidationError) as info:
        await FlowRuntime(registry={"record": record}).run(bp)
    assert ran == []
    one_problem_mentioning(info.value.problems, "'fan'", "no-such-worker")


# -- expressions are compiled before any node runs ------------------------------------------


BAD_EXPRESSIONS = {
    "id": "bad-expressions",
    "nodes": [
        {"id": "a", "uses": "record"},
        {"id": "b", "uses": "record"},
        {"id": "again", "uses": "loop-controller", "params": {"condition": "x.__class__"}},
        {"id": "bare", "uses": "loop-controller"},
    ],
    "edges": [
        {"source": "a", "target": "b", "condition": "result.output >"},
        {"source": "a", "target": "again", "transform": "[x for x in input]"},
        {"source": "b", "target": "again", "condition": "ok", "transform": "input.total"},
        {"source": "again", "target": "bare", "action": "break"},
    ],
}


def test_check_blueprint_reports_every_expression_problem_at_once() -> None:
    bp = WorkflowBlueprint.model_validate(BAD_EXPRESSIONS)  # loading does not compile them
    with pytest.raises(BlueprintValidationError) as info:
        check_blueprint(bp)
    problems = info.value.problems
    assert len(problems) == 4, problems
    one_problem_mentioning(problems, "edge #0 (a -> b)", "condition", "result.output >")
    one_problem_mentioning(problems, "edge #1 (a -> again)", "transform", "comprehension")
    one_problem_mentioning(problems, "node 'again'", "condition", "__class__")
    one_problem_mentioning(problems, "node 'bare'", "needs a 'condition'")


def test_check_blueprint_reports_registry_and_expression_problems_together() -> None:
    bp = WorkflowBlueprint.model_validate(BAD_EXPRESSIONS)
    with pytest.raises(BlueprintValidationError) as info:
        check_blueprint(bp, {"loop-controller": object()})
    one_problem_mentioning(info.value.problems, "'a'", "no implementation", "record")
    assert len(info.value.problems) == 6


async def test_bad_expression_is_refused_at_run_start_and_by_workers() -> None:
    ran: list[str] = []

    async def record(ctx: Any) -> None:
        ran.append(ctx.node_id)

    bp = WorkflowBlueprint.model_validate(BAD_EXPRESSIONS)
    with pytest.raises(BlueprintValidationError, match=r"result\.output >"):
        await FlowRuntime(registry={"record": record}).run(bp)
    assert ran == []
    # Workers load blueprints through the same engine.
    engine = NodeEngine(RuntimeOptions(blueprints={bp.id: bp}, registry={"record": record},
                                       dependencies={}))
    with pytest.raises(BlueprintValidationError, match="comprehension"):
        engine.graph(engine.blueprint(bp.id))


def test_cli_validate_reports_expression_problems(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(BAD_EXPRESSIONS))
    assert main(["validate", str(path)]) == 2
    error = capsys.readouterr().err
    assert "4 problem(s)" in error
    assert "edge #0 (a -> b): condition" in error
    assert "node 'again': condition" in error


# -- the runtime never mutates a blueprint ----------------------------------------------------


async def test_runtime_never_mutates_the_blueprint() -> None:
    parent = load_blueprint(FIXTURES / "content-moderation.json")
    child = load_blueprint(FIXTURES / "redact-post.json")
    before = (parent.to_dict(), child.to_dict())

    async def condition(ctx: Any) -> bool:
        post = await ctx.context.get(ctx.params["inputs"]["userPost"])
        return "PII" in ctx.params["promptTemplate"] and "@" in post

    async def router(ctx: Any) -> NodeResult:
        pii = ctx.context.get_now("_outputs.check_for_pii")
        return NodeResult(output="triaged", action="action_redact" if pii else "action_approve")

    async def process(ctx: Any) -> str:
        return f"processed {ctx.node_id}"

    async def output(ctx: Any) -> Any:
        await ctx.context.set(ctx.params["outputKey"], ctx.input)
        return ctx.input

    runtime = FlowRuntime(
        blueprints={"redact-post": child},
        registry={"llm-condition": condition, "llm-router": router, "llm-process": process,
                  "output": output},
    )
    result = await runtime.run(parent, {"userPost": "mail me at a@b.c", "userId": 7})

    assert result.status == "completed", result.errors
    assert result.context["moderation_result"] == "processed redact_text"
    assert result.context["final_output"] == "processed redact_text"
    assert "_outputs.approve_post_branch" not in result.context
    assert (parent.to_dict(), child.to_dict()) == before


async def test_loaded_fixtures_run_as_written() -> None:
    async def increment(ctx: Any) -> int:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return count

    async def check(ctx: Any) -> NodeResult:
        return NodeResult(output=ctx.input, action="again")

    cycle = load_blueprint(FIXTURES / "counter-cycle.json")
    result = await FlowRuntime(registry={"increment": increment, "check": check}).run(cycle)
    assert result.status == "completed", result.errors
    assert result.context["count"] == 3

    seen: dict[str, Any] = {}

    async def fetch(ctx: Any) -> Any:
        seen["fetch"] = ctx.input
        raise ConnectionError("offline")

    async def cache_lookup(ctx: Any) -> Any:
        return {"body": f"cached from {ctx.params['source']}"}

    async def render(ctx: Any) -> str:
        return f"<p>{ctx.input}</p>"

    resilient = load_blueprint(FIXTURES / "resilient.json")
    runtime = FlowRuntime(registry={"fetch": fetch, "cache-lookup": cache_lookup,
                                    "render": render})
    result = await runtime.run(resilient, {"_request.url": "https://x", "userId": 9})
    assert result.status == "completed", result.errors
    assert seen["fetch"] == {"url": "https://x", "user": 9}
    assert result.context["_outputs.render"] == "<p>cached from disk</p>"


async def test_dynamic_nodes_and_loops_leave_the_blueprint_untouched() -> None:
    from flowcraft import Flow

    async def double(ctx: Any) -> int:
        return ctx.input * 2

    async def bump(ctx: Any) -> int:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return count

    flow = (
        Flow("mixed")
        .batch("fan", double, input_key="items", output_key="doubled")
        .node("bump", bump)
        .edge("fan", "bump")
        .loop("again", start_node_id="bump", end_node_id="bump", condition="count < 3")
    )
    bp = flow.to_blueprint()
    before = bp.to_dict()

    result = await FlowRuntime(registry=flow.registry()).run(bp, {"items": [1, 2, 3]})

    assert result.status == "completed", result.errors
    assert result.context["doubled"] == [2, 4, 6]
    assert result.context["count"] == 3
    assert bp.to_dict() == before
    assert [n.id for n in bp.nodes] == ["fan_scatter", "fan_gather", "bump", "again"]
