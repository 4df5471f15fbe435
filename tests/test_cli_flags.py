"""Nonsense on the command line of the cloud commands is refused before any service is
asked: one line on stderr, exit status 2. Also the adapters' own check of the same
numbers, for code that builds a worker without the command line."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowcraft.adapters._worker import WorkerOptionError, check_worker_options
from flowcraft.cli import UsageError, check_run_id, main, parse_start_context
from flowcraft.errors import FlowcraftError
from flowcraft.local import free_port

BLUEPRINT = {"id": "flags", "nodes": [{"id": "a", "uses": "flags.a"}], "edges": []}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "flags.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "flag_nodes.py").write_text("registry = {'flags.a': lambda ctx: 1}\n")
    return tmp_path


@pytest.fixture
def nowhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service unreachable, without retries: a command that got as far as asking
    one would fail with a connection error instead of the flag's message (or hang)."""
    port = free_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AZURE_STORAGE_CONNECTION_STRING": (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
            f"QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1"),
        "COSMOS_DB_CONNECTION_STRING": f"AccountEndpoint=https://127.0.0.1:{port}/;"
                                       "AccountKey=a2V5;",
        "REDIS_CONNECTION_STRING": f"redis://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SQS_QUEUE_URL", raising=False)


def run(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


def assert_one_line(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowcraft: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


WORKER = ["--registry", "flag_nodes.py:registry", "--blueprints", "blueprints"]
BAD_FLAGS = [
    (["worker", "{backend}", *WORKER, "--concurrency", "0"], ["--concurrency", "at least 1"]),
    (["worker", "{backend}", *WORKER, "--concurrency", "-3"], ["--concurrency", "-3"]),
    (["worker", "{backend}", *WORKER, "--lease-seconds", "-5"], ["--lease-seconds", "-5"]),
    (["worker", "{backend}", *WORKER, "--lease-seconds", "0"], ["--lease-seconds", "more than 0"]),
    (["worker", "{backend}", *WORKER, "--lease-seconds", "nan"], ["--lease-seconds", "nan"]),
    (["worker", "{backend}", *WORKER, "--lease-seconds", "1e9"], ["--lease-seconds", "at most"]),
    (["worker", "{backend}", *WORKER, "--poll-seconds", "0"], ["--poll-seconds", "at least 1"]),
    (["worker", "{backend}", *WORKER, "--poll-seconds", "21"], ["--poll-seconds", "at most 20"]),
    (["worker", "{backend}", *WORKER, "--map-ledger-min-items", "0"],
     ["--map-ledger-min-items", "at least 1"]),
    (["worker", "{backend}", *WORKER, "--map-chunk-items", "-2"],
     ["--map-chunk-items", "at least 1"]),
    (["reconcile", "{backend}", "--blueprints", "blueprints", "--every", "0"],
     ["--every", "more than 0"]),
    (["reconcile", "{backend}", "--blueprints", "blueprints", "--every", "-1"], ["--every"]),
    (["reconcile", "{backend}", "--blueprints", "blueprints", "--every", "inf"], ["--every"]),
    (["reconcile", "{backend}", "--blueprints", "blueprints", "--stalled-threshold", "-1"],
     ["--stalled-threshold", "at least 0"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--timeout", "0"],
     ["--timeout"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--run-id", ""],
     ["--run-id"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--run-id", "a/b"],
     ["--run-id 'a/b'"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--run-id", "x" * 129],
     ["--run-id", "128"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--run-id", "run 7"],
     ["--run-id 'run 7'"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--context", '{"x": NaN}'],
     ["--context", "NaN"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--context",
      '{"x": [1, -Infinity]}'], ["--context", "-Infinity"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--context",
      '{"x": 1e999}'], ["--context", "1e999"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--context",
      '{"_outputs.a": 1}'], ["--context", "_outputs.a", "belongs to the engine"]),
    (["start", "{backend}", "flags", "--blueprints", "blueprints", "--context",
      "[" * 100_000], ["--context"]),
]


@pytest.mark.usefixtures("nowhere")
@pytest.mark.parametrize("backend", ["aws", "azure"])
@pytest.mark.parametrize(("argv", "fragments"), BAD_FLAGS,
                         ids=[" ".join(a[2:])[-40:] for a, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_exit_2_before_any_service_is_asked(
        argv: list[str], fragments: list[str], backend: str, project: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [backend if a == "{backend}" else a for a in argv]
    code, stderr = run(argv, project, monkeypatch)
    assert_one_line(code, stderr, *fragments)


def test_a_context_from_a_file_is_checked_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "ctx.json"
    path.write_text('{"price": NaN}')
    with pytest.raises(UsageError, match="NaN"):
        parse_start_context(f"@{path}")
    path.write_text('{"price": 1.5, "items": [1, 2], "note": null}')
    assert parse_start_context(f"@{path}") == {"price": 1.5, "items": [1, 2], "note": None}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text()
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10))
def test_any_finite_json_value_round_trips(value: Any) -> None:
    assert parse_start_context(json.dumps({"value": value})) == {"value": value}


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", fullmatch=True))
def test_sane_run_ids_are_accepted(run_id: str) -> None:
    assert check_run_id(run_id) == run_id


@given(st.text(min_size=1, max_size=40).filter(
    lambda t: any(c in t for c in "/\\?# \n\t\u00e9") or not t[0].isascii()
    or not t[0].isalnum()))
def test_run_ids_with_other_characters_are_refused(run_id: str) -> None:
    with pytest.raises(UsageError, match="--run-id"):
        check_run_id(run_id)


# -- the adapters' own check ----------------------------------------------------------------

BAD_OPTIONS = [
    {"concurrency": 0}, {"concurrency": -1}, {"concurrency": 2.5}, {"concurrency": True},
    {"lease_seconds": -5}, {"lease_seconds": 0},
    {"lease_seconds": math.nan}, {"lease_seconds": math.inf}, {"lease_seconds": "60"},
    {"max_receive_count": 0}, {"batch_size": 0}, {"poll_wait_seconds": -1},
    {"status_touch_seconds": -1}, {"shutdown_timeout_seconds": -1},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=repr)
def test_adapters_refuse_worker_options_that_cannot_work(options: dict[str, Any]) -> None:
    from flowcraft.adapters.aws import SqsAdapter
    from flowcraft.adapters.azure import AzureQueueAdapter
    from flowcraft.runtime import RuntimeOptions

    [name] = options
    runtime = RuntimeOptions({}, {}, {})
    # The check comes first: nothing is built, so no client is needed.
    with pytest.raises(WorkerOptionError, match=name) as raised:
        SqsAdapter(runtime, None, None, None, "https://queue", **options)  # type: ignore[arg-type]
    assert isinstance(raised.value, FlowcraftError) and isinstance(raised.value, ValueError)
    with pytest.raises(WorkerOptionError, match=name):
        AzureQueueAdapter(runtime, None, None, None, **options)  # type: ignore[arg-type]


def test_the_lease_may_not_exceed_what_the_queue_can_hide_a_message_for() -> None:
    from flowcraft.adapters.aws import SqsAdapter
    from flowcraft.adapters.azure import AzureQueueAdapter
    from flowcraft.runtime import RuntimeOptions

    runtime = RuntimeOptions({}, {}, {})
    with pytest.raises(WorkerOptionError,
                       match="lease_seconds must be more than 0 and at most 43200"):
        SqsAdapter(runtime, None, None, None, "https://queue",  # type: ignore[arg-type]
                   lease_seconds=43_201)
    with pytest.raises(WorkerOptionError, match="max_poll_interval"):
        AzureQueueAdapter(runtime, None, None, None, max_poll_interval=0)  # type: ignore[arg-type]
    for lease in (0.5, 43_200):  # a fractional lease is kept as whole seconds of visibility
        check_worker_options({"lease_seconds": lease, "concurrency": 1, "poll_wait_seconds": 0},
                             max_lease_seconds=43_200)
