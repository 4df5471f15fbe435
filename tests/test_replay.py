"""Event log and replay: in memory from the event store, on workers from the stored records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distributed_helpers import Cluster
from flowcraft import Flow, FlowRuntime, InMemoryEventBus, InMemoryEventStore, replay_context
from flowcraft.cli import main
from flowcraft.events import event_to_dict


def diamond() -> Flow:
    def grow(ctx: Any) -> int:
        ctx.context.set_now("seen", (ctx.context.get_now("seen") or 0) + 1)
        return 1

    return (Flow("replay").node("a", grow)
            .node("b", lambda ctx: {"b": ctx.input})
            .node("c", lambda ctx: "never")
            .node("d", lambda ctx: ctx.input)
            .edge("a", "b", condition="result.output == 1")
            .edge("a", "c", condition="result.output == 2")
            .edge("b", "d").edge("c", "d"))


async def test_event_store_keeps_the_run_and_replay_rebuilds_each_step() -> None:
    flow = diamond()
    store = InMemoryEventStore()
    bus = InMemoryEventBus()
    runtime = FlowRuntime(registry=flow.registry(), event_store=store, event_bus=bus)
    result = await runtime.run(flow.to_blueprint(), {"order": 7}, run_id="r1")
    assert result.status == "completed"
    events = await store.events("r1")
    assert [e.type for e in events] == [e.type for e in bus.history]  # the bus still hears
    steps = runtime.replay(events)
    assert len(steps) == len(events)
    assert steps[0].context == {"order": 7}
    assert steps[-1].nodes == {"a": "completed", "b": "completed", "c": "skipped",
                               "d": "completed"}
    final = {k: v for k, v in steps[-1].context.items() if not k.startswith("_inputs.")}
    assert final == {k: v for k, v in result.context.items() if not k.startswith("_inputs.")}
    # The state at a step: when b finished, d had not run and 'seen' was written.
    (b_done,) = [s for s in steps if s.event.type == "node:finish" and s.node_id == "b"]
    assert b_done.context["_outputs.b"] == {"b": 1} and "_outputs.d" not in b_done.context
    assert b_done.nodes["b"] == "completed" and "d" not in b_done.nodes
    assert b_done.context["seen"] == 1


async def test_the_log_is_a_copy_of_values_changed_later_in_place() -> None:
    shared: dict[str, Any] = {"n": 1}

    async def first(ctx: Any) -> Any:
        return shared

    async def second(ctx: Any) -> Any:
        shared["n"] = 2  # changes the first node's output in place
        return None

    flow = Flow("copy").node("a", first).node("b", second).edge("a", "b")
    store = InMemoryEventStore()
    result = await FlowRuntime(registry=flow.registry(), event_store=store).run(
        flow.to_blueprint(), run_id="r2")
    steps = FlowRuntime().replay(await store.events("r2"))
    (a_done,) = [s for s in steps if s.event.type == "node:finish" and s.node_id == "a"]
    assert a_done.context["_outputs.a"] == {"n": 1}
    assert result.status == "completed"


async def test_replay_covers_a_park_and_its_resume() -> None:
    flow = Flow("park").node("a", lambda ctx: 1).wait("w").node(
        "z", lambda ctx: ctx.input).edge("a", "w").edge("w", "z")
    store = InMemoryEventStore()
    runtime = FlowRuntime(registry=flow.registry(), event_store=store)
    bp = flow.to_blueprint()
    parked = await runtime.run(bp, run_id="p")
    done = await runtime.resume(bp, parked.serialized_context, {"output": "ok"}, run_id="p")
    assert done.status == "completed"
    steps = runtime.replay(await store.events("p"))
    (parked_step,) = [s for s in steps if s.nodes.get("w") == "awaiting"
                      and s.event.type == "node:finish"]
    assert parked_step.context["_awaitingNodeIds"] == ["w"]
    assert steps[-1].nodes == {"a": "completed", "w": "completed", "z": "completed"}
    assert steps[-1].context["_outputs.w"] == "ok" and "_awaitingNodeIds" not in steps[-1].context


async def test_replay_of_a_distributed_run_orders_steps_by_commit() -> None:
    flow = diamond()
    bp = flow.to_blueprint()
    async with Cluster([bp], flow.registry(), workers=2) as cluster:
        result = await cluster.run(bp, {"order": 7}, run_id="d1")
        data = await cluster.client.create_context("d1").load()
    assert result.status == "completed"
    # Reverse the document order: the commit times in the records still order the steps.
    reordered = dict(reversed(list(data.items())))
    steps = replay_context(reordered, "d1")
    finished = [s.node_id for s in steps if s.event.type == "node:finish"]
    assert finished == ["a", "b", "d"]
    assert steps[-1].nodes == {"a": "completed", "b": "completed", "c": "skipped",
                               "d": "completed"}
    # Records keep outputs per step; other keys are known at their final values only.
    assert steps[0].context == {"order": 7, "seen": 1}
    assert "_outputs.a" not in steps[0].context
    assert steps[-1].context["_outputs.d"] == result.context["_outputs.d"]
    assert all(isinstance(data[f"_flowcraft.node.{n}"]["t"], float) for n in "abd")


async def test_replay_of_an_in_memory_serialized_context_follows_document_order() -> None:
    flow = diamond()
    result = await FlowRuntime(registry=flow.registry()).run(flow.to_blueprint())
    steps = replay_context(json.loads(result.serialized_context))
    assert [s.node_id for s in steps if s.event.type == "node:finish"] == ["a", "b", "d"]


def test_cli_replay_prints_the_steps_of_an_event_log(tmp_path: Path, capsys: Any) -> None:
    flow = diamond()
    store = InMemoryEventStore()
    import asyncio

    runtime = FlowRuntime(registry=flow.registry(), event_store=store)
    asyncio.run(runtime.run(flow.to_blueprint(), run_id="c1"))
    log = tmp_path / "events.json"
    log.write_text(json.dumps([event_to_dict(e) for e in asyncio.run(store.events("c1"))]))
    assert main(["replay", str(log)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0 workflow:start"
    assert "node:finish b -> {\"b\":1}" in "\n".join(lines)
    assert lines[-1].endswith("workflow:finish completed")
    assert main(["replay", str(log), "--step", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == {}


def test_cli_replay_refuses_what_is_not_a_log(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["replay", str(bad)]) == 2
    assert "not an event" in capsys.readouterr().err
    bad.write_text("{oops")
    assert main(["replay", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_documented_replay_commands(tmp_path: Path) -> None:
    """docs/cli.md's run --events and replay commands print what the page shows."""
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    from test_docs import REPO, documented_output, same_text

    shutil.copytree(REPO / "examples", tmp_path / "examples")
    run = ("flowcraft run examples/hello.json --registry examples/hello.py:registry "
           "--context '{\"name\": \"Ada\"}' --events hello-events.json")
    show = "flowcraft replay hello-events.json"
    outputs = []
    for command in (run, show):
        documented_output(command)  # fails unless the page shows the command
        completed = subprocess.run([sys.executable, "-m", "flowcraft",
                                    *shlex.split(command)[1:]], cwd=tmp_path,
                                   env=dict(os.environ), capture_output=True, text=True,
                                   timeout=120)
        assert completed.returncode == 0, completed.stderr
        outputs.append(completed.stdout)
    documented = documented_output(show)
    assert documented is not None and same_text(documented, outputs[1]), outputs[1]
