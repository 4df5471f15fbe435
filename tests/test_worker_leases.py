"""A fractional lease keeps its message hidden: visibility is whole seconds, rounded up,
never 0 — Queue Storage refuses a receive with visibility 0, and a renewal to 0 would hand
the message to the next receive while its node runs."""

from __future__ import annotations

from typing import Any

import pytest

from azure_helpers import make_adapter
from flowcraft.distributed.job import JobPayload

pytestmark = pytest.mark.integration


async def test_azure_receive_with_a_fractional_lease_hides_the_message(azure: Any) -> None:
    worker = make_adapter(azure, [], {}, lease_seconds=0.5)
    await azure.queue.send_message(JobPayload("run-1", "bp", "a").to_base64())
    [message] = await worker.backend.queue.receive_once(32)
    # Another worker's receive right after finds nothing.
    assert [m async for m in azure.queue.receive_messages(visibility_timeout=30)] == []

    # Renewing (the heartbeat) keeps it hidden too; 0 still releases it.
    await worker.backend.queue.set_visibility(message, 0.5)
    assert [m async for m in azure.queue.receive_messages(visibility_timeout=30)] == []
    await worker.backend.queue.set_visibility(message, 0)
    assert len([m async for m in azure.queue.receive_messages(visibility_timeout=30)]) == 1
