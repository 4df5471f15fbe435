"""Which failures are retried: NonRetryableError, ``retryOn`` and ``retryMaxDelay``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from flowcraft import (
    BaseNode,
    BlueprintValidationError,
    Flow,
    FlowRuntime,
    NodeContext,
    NonRetryableError,
    WorkflowBlueprint,
    WorkflowResult,
)
from flowcraft.core.executor import retry_delay_seconds


class Declined(NonRetryableError):
    pass


def failing(error: BaseException, attempts: list[int]) -> Any:
    async def node(ctx: NodeContext) -> Any:
        attempts.append(ctx.attempt)
        raise error

    return node


async def run(flow: Flow) -> WorkflowResult:
    return await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint())


async def test_non_retryable_error_stops_retries_but_the_fallback_still_runs() -> None:
    attempts: list[int] = []
    flow = Flow("declined").node("pay", failing(NonRetryableError("card declined"), attempts),
                                 max_retries=5, fallback=lambda ctx: "invoice instead")
    result = await run(flow)
    assert attempts == [1]
    assert result.status == "completed"
    assert result.context["_outputs.pay"] == "invoice instead"


async def test_non_retryable_subclass_from_a_base_node_fails_at_once() -> None:
    attempts: list[int] = []

    class Pay(BaseNode):
        async def exec(self, prepared: Any, ctx: NodeContext) -> Any:
            attempts.append(ctx.attempt)
            raise Declined("card declined")

    result = await run(Flow("declined-class").node("pay", Pay, max_retries=4))
    assert attempts == [1]
    assert result.status == "failed"
    [error] = result.errors
    assert (error.error_type, error.attempt, error.message) == ("Declined", 1, "card declined")


@pytest.mark.parametrize(("retry_on", "error", "expected_attempts"), [
    (["ConnectionError"], ConnectionError("reset"), 3),
    (["ConnectionError"], ValueError("bad input"), 1),
    (["OSError"], ConnectionRefusedError("refused"), 3),  # a name matches subclasses
    (["builtins.ConnectionError"], ConnectionResetError("reset"), 3),
    ([], ConnectionError("reset"), 1),
    (["ConnectionError"], NonRetryableError("never"), 1),
])
async def test_retry_on_lists_the_errors_worth_another_attempt(
    retry_on: list[str], error: BaseException, expected_attempts: int,
) -> None:
    attempts: list[int] = []
    flow = Flow("retry-on").node("call", failing(error, attempts), max_retries=3,
                                 retry_on=retry_on)
    result = await run(flow)
    assert len(attempts) == expected_attempts
    assert result.status == "failed"
    assert result.errors[0].error_type == type(error).__name__


async def test_retry_on_timeouts() -> None:
    attempts: list[int] = []

    async def slow(ctx: NodeContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.sleep(5)

    flow = Flow("slow").node("call", slow, timeout=20, max_retries=3, retry_on=[TimeoutError])
    result = await run(flow)
    assert attempts == [1, 2, 3]
    assert result.errors[0].error_type == "NodeTimeoutError"


async def test_retry_max_delay_caps_exponential_backoff() -> None:
    attempts: list[int] = []
    flow = Flow("capped").node("call", failing(ConnectionError("down"), attempts),
                               max_retries=4, retry_delay=300, retry_backoff="exponential",
                               retry_max_delay=20)
    started = time.perf_counter()
    await run(flow)
    assert attempts == [1, 2, 3, 4]
    assert time.perf_counter() - started < 0.5  # uncapped: 0.3 + 0.6 + 1.2 s at least

    node = flow.to_blueprint().node("call")
    assert all(retry_delay_seconds(node, attempt) == 0.02 for attempt in range(1, 30))


def test_retry_fields_are_optional_camel_case_json() -> None:
    plain = Flow("plain").node("a", lambda ctx: 1, max_retries=2).to_blueprint()
    assert plain.to_dict()["nodes"][0]["config"] == {"maxRetries": 2}

    flow = Flow("full").node("a", lambda ctx: 1, max_retries=3,
                             retry_on=[ConnectionError, "TimeoutError"], retry_max_delay=5000)
    config = flow.to_blueprint().to_dict()["nodes"][0]["config"]
    assert config == {"maxRetries": 3, "retryOn": ["ConnectionError", "TimeoutError"],
                      "retryMaxDelay": 5000}
    loaded = WorkflowBlueprint.from_json(flow.to_blueprint().to_json())
    assert loaded.node("a").config is not None
    assert loaded.node("a").config.retry_on == ["ConnectionError", "TimeoutError"]
    assert loaded.node("a").config.retry_max_delay == 5000


def test_bad_retry_fields_are_validation_problems() -> None:
    with pytest.raises(BlueprintValidationError) as info:
        WorkflowBlueprint.model_validate({"id": "bad", "nodes": [
            {"id": "a", "uses": "x", "config": {"retryMaxDelay": -1, "retryOn": [""]}},
        ]})
    problems = info.value.problems
    assert any("retryMaxDelay must be >= 0" in p for p in problems), problems
    assert any("retryOn holds an empty" in p for p in problems), problems
