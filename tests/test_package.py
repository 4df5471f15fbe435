"""The package as a user meets it: ``import flowcraft`` is cheap and exposes every public
name, and the ``flowcraft`` command behaves like a Unix tool in a pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import flowcraft

EXAMPLES = Path(__file__).parent.parent / "examples"


def python(*args: str, stdout: int | None = subprocess.PIPE,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=os.environ, cwd=cwd, timeout=120, check=False)


# -- import ------------------------------------------------------------------------------------


def test_import_flowcraft_defers_the_models_and_the_runtime() -> None:
    probe = ("import sys, flowcraft; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] == 'pydantic' or m.startswith('flowcraft.')))")
    result = python("-c", probe)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.replace("'", '"')) == []


def test_every_public_name_resolves_and_star_import_works() -> None:
    for name in flowcraft.__all__:
        assert getattr(flowcraft, name) is not None, name
    assert set(flowcraft.__all__) <= set(dir(flowcraft))
    namespace: dict[str, object] = {}
    exec("from flowcraft import *", namespace)
    assert namespace["FlowRuntime"] is flowcraft.FlowRuntime
    from flowcraft.runtime import FlowRuntime

    assert flowcraft.FlowRuntime is FlowRuntime


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        _ = flowcraft.NoSuchThing  # type: ignore[attr-defined]


# -- the command in a pipeline -----------------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "larger than a pipe buffer"])
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path, size: str) -> None:
    # As `flowcraft status ... | head`: the reader has gone before the output is written.
    context = {"name": "Ada"} if size == "small" else {"name": "Ada", "pad": "x" * 200_000}
    (tmp_path / "context.json").write_text(json.dumps(context))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = python("-m", "flowcraft", "run", str(EXAMPLES / "hello.json"),
                        "--registry", f"{EXAMPLES / 'hello.py'}:registry",
                        "--context", "@context.json", "--json", stdout=write_end, cwd=tmp_path)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + 13  # what a tool killed by SIGPIPE reports


# -- packaging ---------------------------------------------------------------------------------

ROOT = Path(__file__).parent.parent


def requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-")


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    # An SPDX string needs setuptools 77; an older one would refuse to build.
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_dev_tools_are_no_public_extra_and_every_one_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dev" not in project["project"]["optional-dependencies"]
    pinned = {requirement_name(line) for line in (ROOT / "constraints.txt").read_text().split()
              if "==" in line}
    tools = [line for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "-"))]
    assert tools
    assert [tool for tool in tools if requirement_name(tool) not in pinned] == []
    setup = (ROOT / "scripts" / "setup").read_text()
    assert "-r requirements-dev.txt" in setup
    assert "requirements-dev.txt -nt" in setup  # editing it re-runs the install
