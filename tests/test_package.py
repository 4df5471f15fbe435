"""The package as a user meets it: ``import flowcraft`` is cheap and exposes every public
name, and the ``flowcraft`` command behaves like a Unix tool in a pipeline."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
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


# -- a bare installation: the wheel without any extra -------------------------------------------


def _requirement_closure(name: str) -> list[str]:
    """``name`` and every distribution it needs (extras' requirements left out)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    found: list[str] = []
    pending = [name]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        for line in importlib.metadata.requires(current) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def _link_installed(distributions: list[str], target: Path) -> None:
    """Symlink the installed files of ``distributions`` (packages, modules, metadata) into
    ``target``: what they need, from this environment, without the rest of it."""
    import importlib.metadata

    target.mkdir()
    for name in distributions:
        distribution = importlib.metadata.distribution(name)
        for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
            if top in ("..", "__pycache__") or (target / top).exists():
                continue
            source = Path(str(distribution.locate_file(top)))
            if source.exists():
                (target / top).symlink_to(source)


@pytest.fixture(scope="module")
def bare_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding what ``pip install flowcraft-py`` installs and
    nothing more: the wheel built from this source tree, and pydantic with what it needs
    (linked from this environment, so no download). Returns its ``bin`` directory.

    Cost: about 10-20 s — building the wheel (pip fetches the build backend, setuptools,
    into an isolated build environment: from PyPI the first time, its cache afterwards),
    creating the environment and installing into it."""
    root = tmp_path_factory.mktemp("bare")
    source = root / "source"
    shutil.copytree(ROOT / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    quiet = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for command in (
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(root / "dist"),
         str(source)],
        [sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=quiet, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (root / "dist").glob("flowcraft_py-*.whl")
    python_bin = root / "venv" / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python_bin), "install",
                           "--quiet", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, env=quiet, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    _link_installed(_requirement_closure("pydantic"), root / "deps")
    purelib = subprocess.run([str(python_bin), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "bare_dependencies.pth").write_text(f"{root / 'deps'}\n")
    return root / "venv" / "bin"


def bare_run(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(cwd),
                   "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=120, check=False)


def test_a_bare_install_has_no_extra_and_its_demo_runs_in_memory_saying_what_is_missing(
        bare_install: Path, tmp_path: Path) -> None:
    probe = ("import importlib.util as u; print([m for m in ('aiobotocore', 'moto', 'azure', "
             "'redis', 'aiohttp', 'opentelemetry') if u.find_spec(m)])")
    found = bare_run(bare_install, "python", "-c", probe, cwd=tmp_path)
    assert (found.returncode, found.stdout.strip()) == (0, "[]"), found.stderr

    demo = bare_run(bare_install, "flowcraft", "demo", "--orders", "2", cwd=tmp_path)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert demo.stderr.splitlines() == [
        'flowcraft demo: the aws-local demo needs the aws and local extras: pip install '
        '"flowcraft-py[aws,local]"; running it in memory instead']
    assert demo.stdout.startswith("flowcraft demo: 2 orders through 'order-pipeline', in this "
                                  "process\n")
    assert "2/2 runs completed" in demo.stdout


@pytest.mark.parametrize(("backend", "extras"), [("aws-local", "aws,local"),
                                                 ("azure-local", "azure")])
def test_a_bare_install_refuses_a_local_backend_asked_for_in_one_line(
        bare_install: Path, tmp_path: Path, backend: str, extras: str) -> None:
    demo = bare_run(bare_install, "flowcraft", "demo", "--backend", backend, cwd=tmp_path)
    assert demo.returncode == 2 and demo.stdout == ""
    (line,) = demo.stderr.splitlines()
    assert line.startswith(f"flowcraft: the {backend} demo needs the ")
    assert line.endswith(f'pip install "flowcraft-py[{extras}]"')


def test_the_demo_says_in_one_line_that_a_local_service_is_missing(tmp_path: Path) -> None:
    # No redis-server on PATH (nor node): the Azure stack cannot start, and says why.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    environment = {**os.environ, "PATH": str(bin_dir)}
    environment.pop("FLOWCRAFT_LOCAL_SERVICES_DIR", None)
    demo = subprocess.run([sys.executable, "-m", "flowcraft", "demo", "--backend",
                           "azure-local"], capture_output=True, text=True, env=environment,
                          cwd=tmp_path, timeout=120, check=False)
    assert demo.returncode == 2, demo.stderr
    assert demo.stderr.splitlines() == [
        "flowcraft: redis-server is not installed: run scripts/setup (or install Redis >= 6)"]


def _imported_modules(path: Path, package: str) -> set[str]:
    """The absolute names of the flowcraft modules ``path`` (in ``package``) imports."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("flowcraft")}


def test_the_library_imports_neither_the_command_line_nor_the_local_services() -> None:
    source = ROOT / "src" / "flowcraft"
    offending = {}
    for path in source.rglob("*.py"):
        relative = path.relative_to(source.parent).with_suffix("")
        if relative.parts[1] in ("cli", "local", "__main__"):
            continue
        package = ".".join(relative.parts if path.name == "__init__.py"
                           else relative.parts[:-1])
        package = package.removesuffix(".__init__")
        found = {name for name in _imported_modules(path, package)
                 if name in ("flowcraft.cli", "flowcraft.local")
                 or name.startswith(("flowcraft.cli.", "flowcraft.local."))}
        if found:
            offending[str(relative)] = found
    assert offending == {}


def test_command_modules_import_only_the_shared_one() -> None:
    cli = ROOT / "src" / "flowcraft" / "cli"
    modules = {path.stem for path in cli.glob("*.py")} - {"__init__"}
    assert {"main", "common", "local", "cloud", "worker", "demo"} <= modules
    for path in cli.glob("*.py"):
        if path.stem in ("__init__", "main"):
            continue
        siblings = {name.split(".")[2] for name in _imported_modules(path, "flowcraft.cli")
                    if name.startswith("flowcraft.cli.")} & modules
        assert siblings <= {"common"}, (path.name, siblings)
