"""Blueprints read from files and directories: a file without an ``id`` is named by its
file name's stem, as the TypeScript library's example files are (``200.json`` runs the
subflow ``"blueprintId": "201"`` from ``201.json``), wherever files load: ``load_blueprint(s)``,
``flowcraft run``, ``flowcraft validate`` and every ``--blueprints DIR``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowcraft import BlueprintValidationError, load_blueprint, load_blueprints
from flowcraft.cli import build_parser, main
from flowcraft.cli.common import runtime_options

# Shaped like the TypeScript library's job-application example: no "id" anywhere, the
# parent refers to its children by file name, node "inputs" are params read by the nodes.
APPLICATION = {
    "nodes": [
        {"id": "check_qualifications", "uses": "llm-condition",
         "params": {"promptTemplate": "Is {{skills}} enough?", "inputs": {"skills": "skills"}}},
        {"id": "send_interview_email", "uses": "subflow",
         "params": {"blueprintId": "201", "inputs": {"applicantName": "applicantName"},
                    "outputs": {"interview_email": "output_email"}}},
        {"id": "send_rejection_email", "uses": "subflow",
         "params": {"blueprintId": "202", "inputs": {"applicantName": "applicantName"},
                    "outputs": {"rejection_email": "output_email"}}},
        {"id": "final_output", "uses": "output",
         "params": {"promptTemplate": "Sent to {{applicantName}}: {{email_body}}",
                    "inputs": {"applicantName": "applicantName",
                               "email_body": ["send_interview_email", "send_rejection_email"]}}},
    ],
    "edges": [
        {"source": "check_qualifications", "target": "send_interview_email", "action": "true"},
        {"source": "check_qualifications", "target": "send_rejection_email", "action": "false"},
        {"source": "send_interview_email", "target": "final_output"},
        {"source": "send_rejection_email", "target": "final_output"},
    ],
}


def email(greeting: str) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "gen_email", "uses": "llm-process",
             "params": {"promptTemplate": greeting + ", {{applicantName}}.",
                        "inputs": {"applicantName": "applicantName"}}},
            {"id": "output_email", "uses": "output",
             "params": {"promptTemplate": "{{result}}", "inputs": {"result": "gen_email"}}},
        ],
        "edges": [{"source": "gen_email", "target": "output_email"}],
    }


# Stand-ins for the example's LLM nodes: fill {{name}} from the context or a node's output.
REGISTRY = '''
from flowcraft import NodeResult


async def lookup(ctx, ref):
    refs = ref if isinstance(ref, list) else [ref]
    for one in refs:
        for key in (one, "_outputs." + one):
            value = await ctx.context.get(key)
            if value is not None:
                return value
    return None


async def fill(ctx):
    text = ctx.params["promptTemplate"]
    for name, ref in ctx.params.get("inputs", {}).items():
        text = text.replace("{{" + name + "}}", str(await lookup(ctx, ref)))
    return text


async def condition(ctx):
    skills = await ctx.context.get("skills")
    return NodeResult(output=skills, action="true" if "Python" in skills else "false")


registry = {"llm-process": fill, "output": fill, "llm-condition": condition}
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    blueprints = tmp_path / "data"
    blueprints.mkdir()
    (blueprints / "200.json").write_text(json.dumps(APPLICATION, indent=2))
    (blueprints / "201.json").write_text(json.dumps(email("We would like to meet you")))
    (blueprints / "202.json").write_text(json.dumps(email("Thank you for applying")))
    (tmp_path / "nodes.py").write_text(REGISTRY)
    return tmp_path


def flowcraft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowcraft", *args], cwd=cwd, env=os.environ,
                          capture_output=True, text=True, timeout=120, check=False)


def write(path: Path, blueprint: dict[str, Any]) -> Path:
    path.write_text(json.dumps(blueprint))
    return path


# -- loading -------------------------------------------------------------------------------------


def test_a_file_without_an_id_is_named_by_its_stem(project: Path) -> None:
    assert load_blueprint(project / "data" / "201.json").id == "201"


def test_an_explicit_id_wins_over_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "201.json", {"id": "interview-email", **email("Hi")})
    assert load_blueprint(path).id == "interview-email"
    assert list(load_blueprints(tmp_path)) == ["interview-email"]


def test_a_directory_is_keyed_by_stem_or_explicit_id(project: Path) -> None:
    write(project / "data" / "named.json", {"id": "welcome", **email("Welcome")})
    assert sorted(load_blueprints(project / "data")) == ["200", "201", "202", "welcome"]


def test_two_files_with_one_id_are_an_error_naming_both(tmp_path: Path) -> None:
    first = write(tmp_path / "201.json", email("Hi"))
    second = write(tmp_path / "other.json", {"id": "201", **email("Hello")})
    with pytest.raises(BlueprintValidationError) as info:
        load_blueprints(tmp_path)
    (problem,) = info.value.problems
    assert "'201' is defined twice" in problem
    assert str(first) in problem and str(second) in problem


def test_a_missing_directory_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    with pytest.raises(BlueprintValidationError, match="is not a directory"):
        load_blueprints(tmp_path / "no-such-dir")


def test_an_invalid_file_without_an_id_is_reported_by_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.json", {"nodes": [{"id": "a", "uses": "x"}],
                                            "edges": [{"source": "a", "target": "nowhere"}]})
    with pytest.raises(BlueprintValidationError) as info:
        load_blueprint(path)
    assert info.value.blueprint_id == "broken.json"
    assert "target 'nowhere' is not a node" in str(info.value)


# -- the command line ----------------------------------------------------------------------------


def test_typescript_style_files_run_unchanged_through_the_cli(project: Path) -> None:
    result = flowcraft("run", "data/200.json", "--blueprints", "data",
                       "--registry", "nodes.py:registry", "--json",
                       "--context", json.dumps({"applicantName": "Ada", "skills": "Python"}),
                       cwd=project)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["status"] == "completed"
    context = outcome["context"]
    assert context["interview_email"] == "We would like to meet you, Ada."
    assert context["_outputs.final_output"] == "Sent to Ada: We would like to meet you, Ada."
    assert "rejection_email" not in context


def test_validate_names_a_file_without_an_id_by_its_stem(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(project / "data" / "201.json")]) == 0
    assert "blueprint '201' is valid" in capsys.readouterr().out


def test_run_refuses_a_file_whose_id_another_file_in_blueprints_has(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    impostor = write(elsewhere / "201.json", email("Go away"))
    code = main(["run", str(impostor), "--blueprints", str(project / "data"),
                 "--registry", f"{project / 'nodes.py'}:registry"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(impostor) in err and str(project / "data" / "201.json") in err


def test_run_accepts_its_own_file_inside_blueprints(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(project / "data" / "201.json"), "--blueprints",
                 str(project / "data"), "--registry", f"{project / 'nodes.py'}:registry",
                 "--context", '{"applicantName": "Bo"}'])
    assert code == 0, capsys.readouterr().err
    assert "We would like to meet you, Bo." in capsys.readouterr().out


@pytest.mark.parametrize("command", [["worker", "aws"], ["start", "aws", "201"],
                                     ["reconcile", "aws"]])
def test_cloud_commands_read_blueprints_dir_by_stem(project: Path, command: list[str]) -> None:
    args = build_parser().parse_args([*command, "--blueprints", str(project / "data")])
    options = runtime_options(args, need_registry=False)
    assert sorted(options.blueprints) == ["200", "201", "202"]
