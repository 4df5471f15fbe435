"""The Celery side of ``bench/scale.py``; runs only in the benchmark's own Celery virtual
environment (``bench/.venv-celery``, from ``bench/celery-requirements.txt``).

* ``celery -A _celery_app worker -P solo ...`` (with ``bench/`` as the working directory)
  loads the app and its two tasks: ``step`` (input + 1) and ``sink`` (the sum of a
  chord's results);
* ``python _celery_app.py drive SHAPE RUNS TIMEOUT`` starts ``RUNS`` runs of ``SHAPE``
  (``chain-50``: a chain of 50 ``step``; ``fan-N``: ``step`` then a chord of N ``step``
  whose body is ``sink``), waits until every run's last task has a result, and prints one
  JSON line: seconds from the first start to the last completion, the executed nodes (a run
  counts when its final value is the exact one: 50 for a chain of 50, 2 * N for a fan) and
  any problems.

Configuration comes from the environment (set by ``bench/scale.py``):
``BENCH_MOTO_HOST``/``BENCH_MOTO_PORT`` (the moto server), ``BENCH_CELERY_QUEUE`` (the SQS
queue, created beforehand) and ``BENCH_CELERY_TABLE`` (the DynamoDB result table, created
beforehand). Transport: SQS with long polling (``wait_time_seconds`` 10, Celery's default)
and no extra client-side pause after an empty poll (``polling_interval`` 0); prefetch is
Celery's default (4 per process). Results: the DynamoDB backend, every task's result stored
(Celery's default), chords counted with its atomic ``UpdateItem`` counter.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from celery import Celery, chain, chord, group
from celery.signals import worker_ready

HOST = os.environ.get("BENCH_MOTO_HOST", "127.0.0.1")
PORT = os.environ.get("BENCH_MOTO_PORT", "5000")
QUEUE = os.environ.get("BENCH_CELERY_QUEUE", "bench-celery")
TABLE = os.environ.get("BENCH_CELERY_TABLE", "bench-celery-results")
READY_LINE = "bench celery worker ready"

app = Celery("bench")
app.conf.update(
    broker_url=f"sqs://testing:testing@{HOST}:{PORT}",
    broker_transport_options={
        "region": "us-east-1",
        "is_secure": False,
        "wait_time_seconds": 10,
        "polling_interval": 0,
        "visibility_timeout": 60,
    },
    broker_connection_retry_on_startup=True,
    result_backend=f"dynamodb://testing:testing@{HOST}:{PORT}/{TABLE}",
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.step")
def step(value: Any = 0) -> Any:
    return (value if isinstance(value, int | float) else 0) + 1


@app.task(name="bench.sink")
def sink(values: list[Any]) -> Any:
    return sum(v for v in values if isinstance(v, int | float))


@worker_ready.connect
def _ready(**_: Any) -> None:
    print(READY_LINE, flush=True)


def workflow(shape: str) -> tuple[Any, int, int]:
    """(the Celery signature of one run, its node count, its exact final value)."""
    kind, _, size_text = shape.partition("-")
    size = int(size_text)
    if kind == "chain":
        return chain(step.s(0), *[step.s() for _ in range(size - 1)]), size, size
    if kind == "fan":
        fan_out = chord(group(step.s() for _ in range(size)), sink.s())
        return chain(step.s(0), fan_out), size + 2, 2 * size
    raise ValueError(f"unknown shape {shape!r}")


def drive(shape: str, runs: int, timeout: float, poll: float = 0.2) -> dict[str, Any]:
    signature, nodes, expected = workflow(shape)
    problems: list[str] = []
    started = time.perf_counter()
    results = [signature.clone().apply_async() for _ in range(runs)]
    deadline = time.monotonic() + timeout
    pending = list(results)
    values: list[Any] = []
    while pending:
        result = pending[0]
        if result.ready():
            values.append(result.result)
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            problems.append(f"{len(pending)} of {runs} runs did not finish within {timeout:.0f} s")
            break
        time.sleep(poll)
    finished = time.perf_counter() if not pending else None
    good = sum(1 for v in values if v == expected)
    if good != len(values):
        bad = [v for v in values if v != expected][:3]
        problems.append(f"{len(values) - good} runs ended with a wrong value {bad!r} "
                        f"(expected {expected})")
    return {"shape": shape, "runs": runs, "nodes": good * nodes,
            "seconds": None if finished is None else finished - started, "problems": problems}


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "drive":
        sys.exit("usage: python _celery_app.py drive SHAPE RUNS TIMEOUT")
    try:
        report = drive(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    except Exception as exc:  # report it to the benchmark as a problem
        report = {"shape": sys.argv[2], "runs": int(sys.argv[3]), "nodes": 0, "seconds": None,
                  "problems": [f"{type(exc).__name__}: {exc}"]}
    print(json.dumps(report), flush=True)
