"""The job message (the wire format): JSON or base64 JSON in, the reference's fields."""

from __future__ import annotations

import base64
import json

import pytest

from flowcraft import FlowcraftError, InvalidJobError
from flowcraft.distributed.job import JobPayload, parse_job

REFERENCE = {"runId": "run-1", "blueprintId": "order", "nodeId": "charge"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def test_parses_the_reference_json() -> None:
    job = parse_job(json.dumps(REFERENCE))
    assert job == JobPayload("run-1", "order", "charge")
    assert job.iteration == 0 and job.attempt is None and job.is_last_attempt is None


def test_parses_base64_json_as_azure_delivers_it() -> None:
    assert parse_job(b64(json.dumps(REFERENCE))) == JobPayload("run-1", "order", "charge")
    assert parse_job(b64(json.dumps(REFERENCE)).encode()) == JobPayload("run-1", "order",
                                                                        "charge")


def test_parses_bytes_dicts_and_surrounding_whitespace() -> None:
    assert parse_job(json.dumps(REFERENCE).encode()) == parse_job(REFERENCE)
    assert parse_job("  \n" + json.dumps(REFERENCE) + "\n") == parse_job(REFERENCE)
    assert parse_job("\n" + b64(json.dumps(REFERENCE)) + " ") == parse_job(REFERENCE)


def test_optional_fields_of_the_reference_and_ours() -> None:
    job = parse_job({**REFERENCE, "attempt": 2, "isLastAttempt": True, "iteration": 3})
    assert (job.attempt, job.is_last_attempt, job.iteration) == (2, True, 3)


def test_extra_fields_are_ignored() -> None:
    job = parse_job({**REFERENCE, "traceId": "abc", "nested": {"x": 1}, "priority": 9})
    assert job == JobPayload("run-1", "order", "charge")


def test_malformed_optional_fields_are_ignored_not_fatal() -> None:
    job = parse_job({**REFERENCE, "attempt": "2", "isLastAttempt": "yes"})
    assert job.attempt is None and job.is_last_attempt is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2", "not valid JSON"),
        ("%%% not base64 %%%", "neither JSON nor base64-encoded JSON"),
        (b64("not json inside"), "neither JSON nor base64-encoded JSON"),
        (base64.b64encode(b"\xff\xfe\xfd").decode(), "neither JSON nor base64-encoded JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ("", "neither JSON nor base64-encoded JSON"),
        ("[1, 2, 3]", "must be a JSON object, got list"),
        ('"a string"', "must be a JSON object, got str"),
        (b64("[1]"), "must be a JSON object, got list"),
        ({"blueprintId": "b", "nodeId": "n"}, "missing runId"),
        ({"runId": "r"}, "missing blueprintId, nodeId"),
        ({"runId": "", "blueprintId": "b", "nodeId": "n"}, "missing runId"),
        ({"runId": 7, "blueprintId": "b", "nodeId": "n"}, "runId must be a string"),
        ({**REFERENCE, "iteration": -1}, "iteration must be a non-negative integer"),
        ({**REFERENCE, "iteration": "1"}, "iteration must be a non-negative integer"),
        ({**REFERENCE, "iteration": True}, "iteration must be a non-negative integer"),
    ],
)
def test_bad_input_is_an_invalid_job_error_saying_what_is_wrong(body: object,
                                                                 message: str) -> None:
    with pytest.raises(InvalidJobError) as info:
        parse_job(body)  # type: ignore[arg-type]
    assert message in info.value.message
    assert isinstance(info.value, FlowcraftError)


def test_long_garbage_is_previewed_not_dumped() -> None:
    with pytest.raises(InvalidJobError) as info:
        parse_job("x" * 5000 + "!")
    assert len(info.value.message) < 200


def test_invalid_job_names_its_run_when_it_can() -> None:
    with pytest.raises(InvalidJobError) as info:
        parse_job({"runId": "r-9", "nodeId": "n"})
    assert info.value.run_id == "r-9"
    with pytest.raises(InvalidJobError) as info:
        parse_job({"blueprintId": "b", "nodeId": "n"})
    assert info.value.run_id is None


@pytest.mark.parametrize(
    "job",
    [
        JobPayload("r", "b", "n"),
        JobPayload("run/with:odd chars é", "bp", "node-1", iteration=4, attempt=2,
                   is_last_attempt=False),
        JobPayload("r", "b", "n", attempt=1, is_last_attempt=True),
    ],
)
def test_round_trip(job: JobPayload) -> None:
    assert parse_job(job.to_json()) == job
    assert parse_job(job.to_base64()) == job
    assert parse_job(job.to_dict()) == job


def test_wire_format_is_the_references_camel_case() -> None:
    job = JobPayload("r", "b", "n")
    assert json.loads(job.to_json()) == {"runId": "r", "blueprintId": "b", "nodeId": "n"}
    full = JobPayload("r", "b", "n", iteration=2, attempt=1, is_last_attempt=True)
    assert json.loads(full.to_json()) == {"runId": "r", "blueprintId": "b", "nodeId": "n",
                                          "iteration": 2, "attempt": 1,
                                          "isLastAttempt": True}
    assert json.loads(base64.b64decode(full.to_base64())) == json.loads(full.to_json())


def test_key_identifies_one_execution() -> None:
    assert JobPayload("r", "b", "n", 2).key == "r:n:2"
    assert JobPayload("r", "b", "n").key != JobPayload("r", "b", "n", 1).key


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_trace_context_round_trips_and_is_not_part_of_the_identity() -> None:
    job = JobPayload("r", "b", "n", trace={"traceparent": TRACEPARENT, "tracestate": "k=v"})
    assert json.loads(job.to_json())["trace"] == {"traceparent": TRACEPARENT,
                                                  "tracestate": "k=v"}
    for wire in (job.to_json(), job.to_base64(), job.to_dict()):
        parsed = parse_job(wire)
        assert parsed.trace == job.trace
    assert job == JobPayload("r", "b", "n") and hash(job) == hash(JobPayload("r", "b", "n"))
    assert "trace" not in JobPayload("r", "b", "n").to_dict()


@pytest.mark.parametrize("trace", [
    "00-abc", 7, [], {}, {"traceparent": 5}, {"tracestate": "k=v"}, None,
])
def test_malformed_trace_context_is_dropped_not_fatal(trace: object) -> None:
    job = parse_job(json.dumps({**REFERENCE, "trace": trace}))
    assert job == JobPayload("run-1", "order", "charge") and job.trace is None


def test_trace_context_keeps_only_the_w3c_fields() -> None:
    job = parse_job({**REFERENCE, "trace": {"traceparent": TRACEPARENT, "baggage": "x",
                                            "tracestate": 3}})
    assert job.trace == {"traceparent": TRACEPARENT}
