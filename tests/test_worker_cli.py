"""``flowcraft worker aws --dependencies MODULE:FACTORY`` against moto: an async context
manager opens what nodes use before the first job and closes it after SIGTERM; bad specs
are one-line usage errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from aws_helpers import make_moto_dynamodb_atomic

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)  # see aws_helpers: moto loses concurrent updates


NODES = '''
import contextlib
from pathlib import Path

LOG = Path(__file__).with_name("resources.log")


class Pool:
    def lookup(self, key):
        return f"{key} from the pool"


@contextlib.asynccontextmanager
async def resources():
    LOG.write_text("opened\\n")
    try:
        yield {"pool": Pool()}
    finally:
        with LOG.open("a") as log:
            log.write("closed\\n")


def plain():
    return {"pool": Pool()}


async def lookup(ctx):
    return ctx.dependencies["pool"].lookup(ctx.input or "order")


registry = {"deps.lookup": lookup}
'''

BLUEPRINT = {"id": "deps-demo", "nodes": [{"id": "a", "uses": "deps.lookup"}], "edges": []}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "deps-demo.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "deps_nodes.py").write_text(NODES)
    return tmp_path


async def flowcraft(*args: str, env: dict[str, str], cwd: Path,
                    timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("factory", ["resources", "plain"])
async def test_worker_dependencies_reach_nodes_and_are_closed_on_sigterm(
        aws: Any, project: Path, factory: str) -> None:
    env = aws.environment()
    blueprints = str(project / "blueprints")
    log = (project / "worker.out").open("w")
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "flowcraft", "worker", "aws", "--registry",
        "deps_nodes.py:registry", "--blueprints", blueprints, "--dependencies",
        f"deps_nodes.py:{factory}", "--lease-seconds", "5", "--poll-seconds", "1",
        env=env, cwd=project, stdout=log, stderr=asyncio.subprocess.PIPE)
    try:
        code, out, err = await flowcraft("start", "aws", "deps-demo", "--blueprints",
                                         blueprints, "--wait", "--timeout", "60",
                                         env=env, cwd=project, timeout=90)
        assert code == 0, err
        result = json.loads(out.partition("\n")[2])
        assert result["context"]["_outputs.a"] == "order from the pool"
        if factory == "resources":
            assert (project / "resources.log").read_text() == "opened\n"
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        _, worker_err = await asyncio.wait_for(worker.communicate(), 30)
        log.close()
    assert worker.returncode == 0, worker_err.decode()
    assert "Traceback" not in worker_err.decode()
    output = (project / "worker.out").read_text()
    assert "flowcraft worker (aws)" in output and "service calls" in output
    if factory == "resources":
        assert (project / "resources.log").read_text() == "opened\nclosed\n"


@pytest.mark.parametrize(("spec", "message"), [
    ("deps_nodes.py", "use MODULE:FACTORY"),
    ("deps_nodes.py:missing", "deps_nodes.py has no attribute 'missing'"),
    ("no_such_module:factory", "cannot import no_such_module"),
    ("deps_nodes.py:LOG", "expected a mapping or a factory returning one, got PosixPath"),
])
async def test_bad_dependencies_spec_is_a_one_line_usage_error(
        project: Path, spec: str, message: str) -> None:
    code, _, err = await flowcraft(
        "worker", "aws", "--registry", "deps_nodes.py:registry", "--blueprints",
        str(project / "blueprints"), "--dependencies", spec,
        env=dict(os.environ), cwd=project)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
