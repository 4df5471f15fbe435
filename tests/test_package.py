"""The package as a user meets it: ``import flowcraft`` is cheap and exposes every public
name, and the ``flowcraft`` command behaves like a Unix tool in a pipeline."""

from __future__ import annotations

import contextlib
import io
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
    # pydantic and the runtime are what made `import flowcraft` cost ~300 ms.
    heavy = ("pydantic", "flowcraft.blueprint", "flowcraft.runtime", "flowcraft.analysis",
             "flowcraft.expressions", "asyncio")
    probe = ("import json, sys, flowcraft; print(json.dumps(sorted(m for m in sys.modules "
             f"if m.startswith({heavy!r}))))")
    result = python("-c", probe)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


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


# -- the documented commands, as a new user types them ------------------------------------------

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED_BASH = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def bash_blocks(path: Path) -> list[str]:
    return FENCED_BASH.findall(path.read_text(encoding="utf-8"))


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``flowcraft ...`` line of a bash block, split as the shell would, up to a pipe,
    ``&`` or comment, leading ``VAR=value`` assignments dropped."""
    import shlex

    found = []
    for path in DOC_FILES:
        for block in bash_blocks(path):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words.pop(0)
                if not words or words[0] != "flowcraft":
                    continue
                for stop in ("|", "&", "&&", ";"):
                    if stop in words:
                        words = words[:words.index(stop)]
                found.append((f"{path.name}: {line.strip()}", words[1:]))
    return found


COMMANDS = documented_commands()


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_commands_parse_as_written(where: str, argv: list[str]) -> None:
    from flowcraft.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}\n  {stderr.getvalue().strip()}")
    context = getattr(args, "context", None)
    if isinstance(context, str) and not context.startswith("@"):
        assert isinstance(json.loads(context), dict), where
    if args.command in ("worker", "reconcile"):
        # Without the registry a reconciler counts every run as failed.
        assert args.registry, f"{where}: needs --registry"


def test_the_docs_show_commands_of_every_kind() -> None:
    commands = {argv[0] for _, argv in COMMANDS}
    assert {"run", "graph", "validate", "provision", "worker", "start", "status",
            "reconcile"} <= commands


@pytest.mark.parametrize("page", ["aws.md", "azure.md"])
def test_every_variable_a_cloud_example_reads_is_exported_on_its_page(page: str) -> None:
    path = ROOT / "docs" / page
    text = path.read_text(encoding="utf-8")
    python = "".join(re.findall(r"^```python\n(.*?)^```", text, re.M | re.S))
    read = set(re.findall(r"os\.environ\[\"([A-Z_]+)\"\]", python))
    exported = {name for block in bash_blocks(path)
                for line in block.splitlines() if line.startswith("export ")
                for name in re.findall(r"\b([A-Z_]+)=", line)}
    assert read, page
    assert read - exported == set(), f"{page}: examples read variables no step exports"


def test_azure_page_shows_the_local_emulators_keys() -> None:
    from flowcraft.local import AZURITE_ACCOUNT, AZURITE_KEY, COSMOS_EMULATOR_KEY

    text = (ROOT / "docs" / "azure.md").read_text(encoding="utf-8")
    assert f"AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};" in text
    assert f"AccountKey={COSMOS_EMULATOR_KEY};" in text
