"""In-memory throughput benchmark: flowcraft (Python) against the TypeScript reference.

    .venv/bin/python bench/inmemory.py                      # everything (about 6-7 min)
    .venv/bin/python bench/inmemory.py --sizes 1000,10000 --skip-reference

Two graph shapes of trivial async nodes (each returns its input + 1; a node handed a
mapping returns the sum of its values):

* ``chain``: n0 -> n1 -> ... -> n(N-1)
* ``fan``:   n0 -> {n1 .. n(N-2)} -> n(N-1); the sink is an ``all`` join and receives a
  mapping of N-2 inputs.

Every case runs in a fresh process (Python: this file with ``--worker``; reference:
``node bench/reference/inmemory.mjs``), so cases cannot pollute each other. Only the
engine's ``run`` call is timed: the blueprint dict is built and validated before the
clock starts. The worker checks the result (status ``completed``, one output per node,
the sink's exact output in Python and in the reference's chain), so a broken engine
cannot produce a fast number.

Peak RSS is the same for both languages: ``ru_maxrss`` of the case's own process as
reported by ``os.wait4`` when this driver reaps it (what ``/usr/bin/time -v`` prints as
"Maximum resident set size"). It includes interpreter start-up and the blueprint.
MB here means MiB (2**20 bytes); target (c) is 1024 MiB.

This is a benchmark, not a test: it prints PASS/MISS per target and always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REFERENCE_DIR = BENCH_DIR / "reference"
REFERENCE_SCRIPT = REFERENCE_DIR / "inmemory.mjs"
SHAPES = ("chain", "fan")
MIB = 1024 * 1024


# -- blueprints (the same shape and ids as bench/reference/inmemory.mjs) ------------------


def build_blueprint(shape: str, n: int) -> dict[str, Any]:
    nodes = [{"id": f"n{i}", "uses": "step"} for i in range(n)]
    if shape == "chain":
        edges = [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(n - 1)]
    elif shape == "fan":
        sink = f"n{n - 1}"
        edges = [{"source": "n0", "target": f"n{i}"} for i in range(1, n - 1)]
        edges += [{"source": f"n{i}", "target": sink} for i in range(1, n - 1)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return {"id": f"bench-{shape}-{n}", "nodes": nodes, "edges": edges}


def build_small_blueprint(shape: str) -> dict[str, Any]:
    """The small-run shapes (the same ids as bench/reference/inmemory.mjs):

    * ``diamond`` (5 nodes): n0 -> {n1, n2, n3} -> n4, an ``all`` join.
    * ``gate20`` (20 nodes): n0 -> {n1 .. n6} -> n7 (``all`` join); n7 -> n8 if
      ``result.output`` (taken) and n7 -> n14 if ``result.missing`` (not taken;
      the reference evaluates property paths only);
      n8 -> ... -> n13 and n14 -> ... -> n18 (skipped); both reach n19, an ``any`` join.
      15 nodes run.
    """
    if shape == "diamond":
        nodes = [{"id": f"n{i}", "uses": "step"} for i in range(5)]
        edges = [{"source": "n0", "target": f"n{i}"} for i in (1, 2, 3)]
        edges += [{"source": f"n{i}", "target": "n4"} for i in (1, 2, 3)]
    elif shape == "gate20":
        nodes = [{"id": f"n{i}", "uses": "step"} for i in range(19)]
        nodes.append({"id": "n19", "uses": "step", "config": {"joinStrategy": "any"}})
        edges = [{"source": "n0", "target": f"n{i}"} for i in range(1, 7)]
        edges += [{"source": f"n{i}", "target": "n7"} for i in range(1, 7)]
        edges += [{"source": "n7", "target": "n8", "condition": "result.output"},
                  {"source": "n7", "target": "n14", "condition": "result.missing"}]
        edges += [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(8, 13)]
        edges += [{"source": f"n{i}", "target": f"n{i + 1}"} for i in range(14, 18)]
        edges += [{"source": "n13", "target": "n19"}, {"source": "n18", "target": "n19"}]
    else:
        raise ValueError(f"unknown small shape {shape!r}")
    return {"id": f"bench-{shape}", "nodes": nodes, "edges": edges}


# shape: (nodes that run, the sink's output)
SMALL_EXPECTED = {"diamond": (5, 6), "gate20": (15, 19)}


def expected_sink_output(shape: str, n: int) -> int:
    # chain: n0 gets no input and returns 1, each next node adds 1.
    # fan: n0 -> 1, each middle -> 2, the sink sums the mapping of N-2 twos.
    return n if shape == "chain" else 2 * (n - 2)


# -- worker: one Python case in this (fresh) process --------------------------------------


def run_python_worker(shape: str, n: int) -> dict[str, Any]:
    import asyncio
    import resource

    from flowcraft import FlowRuntime, WorkflowBlueprint

    async def step(ctx: Any) -> Any:
        x = ctx.input
        if isinstance(x, Mapping):
            return sum(x.values())
        return (x or 0) + 1

    raw = build_blueprint(shape, n)
    started = time.perf_counter()
    blueprint = WorkflowBlueprint.model_validate(raw)
    validate_seconds = time.perf_counter() - started
    del raw
    rss_before_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    async def main() -> tuple[Any, float]:
        runtime = FlowRuntime(registry={"step": step})
        t0 = time.perf_counter()
        result = await runtime.run(blueprint, {})
        return result, time.perf_counter() - t0

    result, seconds = asyncio.run(main())

    sink = f"n{n - 1}"
    context = result.context
    sink_output = context.get(f"_outputs.{sink}")
    outputs = sum(1 for key in context if key.startswith("_outputs."))
    problems = []
    if result.status != "completed":
        problems.append(f"status is {result.status!r}")
    if sink_output != expected_sink_output(shape, n):
        problems.append(f"sink output {sink_output!r} != {expected_sink_output(shape, n)}")
    if outputs != n:
        problems.append(f"{outputs} node outputs, expected {n}")
    if result.errors:
        problems.append(f"errors: {result.errors[0].message}")
    record: dict[str, Any] = {
        "ok": not problems,
        "shape": shape,
        "n": n,
        "seconds": seconds,
        "status": result.status,
        "validateSeconds": validate_seconds,
        "maxRssBeforeRun": rss_before_run,
    }
    if problems:
        record["error"] = "; ".join(problems)
    return record


def run_python_small_worker(shape: str, runs: int) -> dict[str, Any]:
    """``runs`` runs of a small shape one after another, then ``runs`` started at once.
    Rates are per CPU second of this process (the machine may be shared)."""
    import asyncio

    from flowcraft import FlowRuntime, WorkflowBlueprint

    async def step(ctx: Any) -> Any:
        x = ctx.input
        if isinstance(x, Mapping):
            return sum(x.values())
        return (x or 0) + 1

    blueprint = WorkflowBlueprint.model_validate(build_small_blueprint(shape))
    executed, sink_value = SMALL_EXPECTED[shape]
    problems: list[str] = []

    def check(result: Any) -> None:
        outputs = sum(1 for key in result.context if key.startswith("_outputs."))
        sink = result.context.get(f"_outputs.n{len(blueprint.nodes) - 1}")
        if result.status != "completed" or outputs != executed or sink != sink_value:
            problems.append(f"status {result.status}, {outputs} outputs, sink {sink!r}")

    async def main() -> dict[str, float]:
        runtime = FlowRuntime(registry={"step": step})
        for _ in range(20):  # warm-up: caches, the blueprint's graph
            check(await runtime.run(blueprint, {}))
        timings: dict[str, float] = {}
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(runs):
            check(await runtime.run(blueprint, {}))
        timings["sequentialCpu"] = time.process_time() - cpu
        timings["sequentialWall"] = time.perf_counter() - wall
        cpu, wall = time.process_time(), time.perf_counter()
        for result in await asyncio.gather(*(runtime.run(blueprint, {}) for _ in range(runs))):
            check(result)
        timings["concurrentCpu"] = time.process_time() - cpu
        timings["concurrentWall"] = time.perf_counter() - wall
        return timings

    timings = asyncio.run(main())
    record: dict[str, Any] = {"ok": not problems, "shape": shape, "runs": runs, **timings}
    if problems:
        record["error"] = f"{len(problems)} bad runs, first: {problems[0]}"
    return record


SMALL_SHAPES = ("diamond", "gate20")
SMALL_MODES = (("sequential", "one after another"), ("concurrent", "all at once"))


def run_small(shapes: list[str], runs: int, repeat: int, timeout: float, node: str | None,
              run_reference: bool) -> list[dict[str, Any]]:
    """Small runs: the median over ``repeat`` fresh-process pairs, Python and reference
    interleaved so both see the same load."""
    rows = []
    for shape in shapes:
        samples: dict[str, dict[str, list[float]]] = {"python": {}, "reference": {}}
        failures: dict[str, str] = {}
        for _ in range(repeat):
            cmds = {"python": [sys.executable, str(Path(__file__).resolve()), "--worker-small",
                               shape, str(runs)]}
            if run_reference:
                cmds["reference"] = [node, str(REFERENCE_SCRIPT), "small", shape, str(runs)]  # type: ignore[list-item]
            for who, cmd in cmds.items():
                record, _, code, timed_out, stderr = run_process(cmd, timeout)
                if timed_out or record is None or not record.get("ok") or code != 0:
                    why = "TIMEOUT" if timed_out else ((record or {}).get("error")
                                                       or _tail(stderr) or f"exit {code}")
                    failures[who] = str(why)
                    continue
                for mode, _label in SMALL_MODES:
                    samples[who].setdefault(mode, []).append(runs / record[f"{mode}Cpu"])
                    samples[who].setdefault(mode + "Wall", []).append(
                        runs / record[f"{mode}Wall"])
        for mode, label in SMALL_MODES:
            row: dict[str, Any] = {"shape": shape, "mode": label}
            for who in ("python", "reference"):
                values = sorted(samples[who].get(mode, []))
                walls = sorted(samples[who].get(mode + "Wall", []))
                row[who] = values[len(values) // 2] if values else None
                row[who + "Wall"] = walls[len(walls) // 2] if walls else None
                row[who + "Failure"] = failures.get(who)
            rows.append(row)
            py, ref = row["python"], row["reference"]
            ratio = f"{py / ref:.2f}x" if py and ref else "-"
            print(f"  {shape:8} {label:18} python {_fmt(py, row['pythonFailure'])} runs/CPU-s "
                  f"(wall {_fmt(row['pythonWall'], None)}), reference "
                  f"{_fmt(ref, row['referenceFailure'])} (wall {_fmt(row['referenceWall'], None)})"
                  f", ratio {ratio}", flush=True)
    return rows


def _fmt(value: float | None, failure: str | None) -> str:
    if failure and value is None:
        return f"FAIL ({failure[:120]})"
    return f"{value:,.0f}" if value else "-"


def print_small_targets(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        label = f"(d) {row['shape']} {row['mode']}: python >= 2x reference runs per CPU second"
        py, ref = row["python"], row["reference"]
        if not py or not ref:
            print(f"  [N/A ] {label}: needs both sides")
        else:
            state = "PASS" if py / ref >= 2 else "MISS"
            print(f"  [{state:4}] {label}: {py:,.0f} vs {ref:,.0f} = {py / ref:.2f}x")


# -- driver --------------------------------------------------------------------------------


@dataclass
class CaseResult:
    ok: bool
    seconds: float | None = None  # best of the repeats
    peak_rss: int | None = None  # bytes, max over the repeats (or up to the failure)
    failure: str | None = None  # short label for the table: TIMEOUT, OOM, FAIL
    timeout: float | None = None  # the time limit, when failure is TIMEOUT
    detail: str = ""
    runs: list[dict[str, Any]] = field(default_factory=list)

    def rate(self, n: int) -> float | None:
        return n / self.seconds if self.ok and self.seconds else None


def run_process(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, int, int | None,
                                                          bool, str]:
    """Run one case; return (its JSON record, peak RSS bytes, exit code, timed out, stderr)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.send_signal(signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    record = None
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pass
            break
    return record, usage.ru_maxrss * 1024, proc.returncode, timed_out, stderr


def run_case(cmd: list[str], repeat: int, timeout: float) -> CaseResult:
    result = CaseResult(ok=False)
    best: float | None = None
    peak = 0
    for _ in range(repeat):
        record, rss, code, timed_out, stderr = run_process(cmd, timeout)
        peak = max(peak, rss)
        result.peak_rss = peak
        if record is not None:
            result.runs.append(record)
        if timed_out:
            result.failure = "TIMEOUT"
            result.timeout = timeout
            result.detail = f"killed after {timeout:g} s (peak RSS {peak / MIB:.0f} MB by then)"
            return result
        if "heap out of memory" in stderr or "Reached heap limit" in stderr or (
            "MemoryError" in stderr
        ):
            result.failure = "OOM"
            result.detail = f"out of memory (exit {code}, peak RSS {peak / MIB:.0f} MB)"
            return result
        if record is None or not record.get("ok") or code != 0:
            result.failure = "FAIL"
            why = (record or {}).get("error") or _tail(stderr) or "no result printed"
            result.detail = f"exit {code}: {why}"
            return result
        seconds = float(record["seconds"])
        best = seconds if best is None else min(best, seconds)
    result.ok = True
    result.seconds = best
    return result


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:300]


def ensure_reference(node: str | None) -> str | None:
    """None when the reference is ready, else why it is not."""
    if node is None:
        return "node not found on PATH"
    if (REFERENCE_DIR / "node_modules" / "flowcraft" / "package.json").exists():
        return None
    npm = shutil.which("npm")
    if npm is None:
        return "bench/reference/node_modules is missing and npm is not on PATH"
    print("installing the reference: npm ci in bench/reference ...", flush=True)
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REFERENCE_DIR,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return f"npm ci failed: {_tail(proc.stderr)}"
    return None


def reference_version() -> str:
    try:
        data = json.loads((REFERENCE_DIR / "node_modules" / "flowcraft" / "package.json")
                          .read_text(encoding="utf-8"))
        return str(data.get("version", "?"))
    except OSError:
        return "?"


def fmt_rate(result: CaseResult | None, n: int) -> str:
    if result is None:
        return "-"
    if not result.ok:
        return result.failure or "FAIL"
    return f"{result.rate(n):,.0f}"


def fmt_seconds(result: CaseResult | None) -> str:
    if result is None:
        return "-"
    if not result.ok:
        return result.failure or "FAIL"
    assert result.seconds is not None
    return f"{result.seconds:.3f}"


def fmt_rss(result: CaseResult | None) -> str:
    if result is None or result.peak_rss is None:
        return "-"
    text = f"{result.peak_rss / MIB:,.0f}"
    return text if result.ok else f"({text})"


def print_table(rows: list[tuple[str, int, CaseResult | None, CaseResult | None]]) -> None:
    headers = ["shape", "N", "py s", "py nodes/s", "py RSS MB", "ref s", "ref nodes/s",
               "ref RSS MB", "ratio py/ref"]
    body = []
    for shape, n, py, ref in rows:
        py_rate = py.rate(n) if py else None
        ref_rate = ref.rate(n) if ref else None
        ratio = f"{py_rate / ref_rate:.2f}x" if py_rate and ref_rate else "-"
        body.append([shape, f"{n:,}", fmt_seconds(py), fmt_rate(py, n), fmt_rss(py),
                     fmt_seconds(ref), fmt_rate(ref, n), fmt_rss(ref), ratio])
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) if i > 0 else h.ljust(w) for i, (h, w) in
                     enumerate(zip(headers, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in body:
        print("  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))


def print_targets(shapes: list[str], py: dict[tuple[str, int], CaseResult],
                  ref: dict[tuple[str, int], CaseResult], skip_reference: bool) -> None:
    print("\nTargets")

    def verdict(label: str, state: str, text: str) -> None:
        print(f"  [{state:4}] {label}: {text}")

    for shape in shapes:
        label = f"(a) {shape}: python >= 3x reference nodes/s at 10k"
        p, r = py.get((shape, 10_000)), ref.get((shape, 10_000))
        if p is None:
            verdict(label, "N/A", "10k not in --sizes")
        elif skip_reference or r is None:
            verdict(label, "N/A", "reference not run")
        elif not p.ok:
            verdict(label, "MISS", f"python {p.failure}: {p.detail}")
        elif not r.ok:
            verdict(label, "N/A", f"reference {r.failure}: {r.detail}")
        else:
            ratio = p.rate(10_000) / r.rate(10_000)  # type: ignore[operator]
            verdict(label, "PASS" if ratio >= 3 else "MISS",
                    f"{p.rate(10_000):,.0f} vs {r.rate(10_000):,.0f} nodes/s = {ratio:.2f}x")
    for shape in shapes:
        label = f"(b) {shape}: nodes/s at 1k / nodes/s at 100k <= 2"
        small, big = py.get((shape, 1_000)), py.get((shape, 100_000))
        if small is None or big is None:
            verdict(label, "N/A", "needs 1k and 100k in --sizes")
        elif not small.ok:
            verdict(label, "MISS", f"1k {small.failure}: {small.detail}")
        elif not big.ok:
            bound = ""
            if big.timeout and small.rate(1_000):
                # It did not finish in the time limit: its rate is below 100k / limit.
                floor = small.rate(1_000) / (100_000 / big.timeout)  # type: ignore[operator]
                bound = f"; ratio > {floor:.1f}"
            verdict(label, "MISS", f"100k {big.failure}: {big.detail}{bound}")
        else:
            ratio = small.rate(1_000) / big.rate(100_000)  # type: ignore[operator]
            verdict(label, "PASS" if ratio <= 2 else "MISS",
                    f"{small.rate(1_000):,.0f} / {big.rate(100_000):,.0f} nodes/s = {ratio:.2f}")
    for shape in shapes:
        label = f"(c) {shape}: 100k nodes under 1 GB (1024 MB) peak RSS"
        big = py.get((shape, 100_000))
        if big is None:
            verdict(label, "N/A", "100k not in --sizes")
        elif not big.ok:
            verdict(label, "MISS", f"did not complete ({big.failure}): {big.detail}")
        else:
            rss = (big.peak_rss or 0) / MIB
            verdict(label, "PASS" if rss < 1024 else "MISS", f"{rss:,.0f} MB")


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_size(text: str) -> int:
    text = text.lower().replace("_", "")
    scale = 1
    if text.endswith("k"):
        text, scale = text[:-1], 1000
    value = int(float(text) * scale)
    if value < 3:
        raise argparse.ArgumentTypeError("sizes must be >= 3")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000",
                        help="comma-separated node counts (1k suffix allowed); default %(default)s")
    parser.add_argument("--shapes", default="chain,fan", help="chain, fan; default %(default)s")
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not run the TypeScript reference")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh-process runs per case; best time is reported (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one case process may take before it is killed "
                             "(default %(default)s)")
    parser.add_argument("--reference-max-n", type=int, default=10_000,
                        help="larger sizes are not run on the reference, which runs out of "
                             "memory at ~30k chain nodes (default %(default)s)")
    parser.add_argument("--node-heap-mb", type=int, default=8192,
                        help="node --max-old-space-size for the reference (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write every result as JSON here")
    parser.add_argument("--small-shapes", default="diamond,gate20",
                        help="small-run shapes (diamond, gate20; empty: none); "
                             "default %(default)s")
    parser.add_argument("--small-runs", type=int, default=3000,
                        help="runs per small-run case, each way (default %(default)s)")
    parser.add_argument("--small-repeat", type=int, default=3,
                        help="fresh-process pairs per small shape; the median is reported "
                             "(default %(default)s)")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-small", nargs=2, metavar=("SHAPE", "RUNS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker_small:
        shape, runs_text = args.worker_small
        try:
            record = run_python_small_worker(shape, int(runs_text))
        except Exception as exc:  # report, let the driver show it as FAIL
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(record), flush=True)
        return 0 if record.get("ok") else 1

    if args.worker:
        shape, n_text = args.worker
        try:
            record = run_python_worker(shape, int(n_text))
        except Exception as exc:  # report, let the driver show it as FAIL
            record = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(record), flush=True)
        return 0 if record.get("ok") else 1

    sizes = [parse_size(s) for s in parse_list(args.sizes)]
    shapes = parse_list(args.shapes)
    small_shapes = parse_list(args.small_shapes)
    for shape in small_shapes:
        if shape not in SMALL_SHAPES:
            parser.error(f"unknown small shape {shape!r} (choose from {', '.join(SMALL_SHAPES)})")
    for shape in shapes:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    repeat = max(1, args.repeat)

    node = shutil.which("node")
    ref_problem = None if args.skip_reference else ensure_reference(node)
    run_reference = not args.skip_reference and ref_problem is None

    from importlib.metadata import PackageNotFoundError, version
    try:
        py_version = version("flowcraft-py")
    except PackageNotFoundError:
        py_version = "?"
    print(f"flowcraft (python) {py_version} on Python {platform.python_version()}; "
          f"{os.cpu_count()} CPUs; {platform.machine()}")
    if args.skip_reference:
        print("reference: skipped (--skip-reference)")
    elif ref_problem:
        print(f"reference: unavailable ({ref_problem})")
    else:
        node_version = subprocess.run([node, "--version"], capture_output=True, text=True,  # type: ignore[list-item]
                                      check=False).stdout.strip()
        print(f"reference: npm flowcraft {reference_version()} on node {node_version} "
              f"(--max-old-space-size={args.node_heap_mb}), sizes <= {args.reference_max_n:,}")
    print(f"each case: fresh process, best of {repeat}, time limit {args.timeout:g} s; "
          "timed: run() only; peak RSS: ru_maxrss of the case process (wait4)\n", flush=True)

    small_rows: list[dict[str, Any]] = []
    if small_shapes:
        print(f"small runs: {args.small_runs:,} runs each way, median of "
              f"{args.small_repeat} fresh processes per side; rates per CPU second")
        small_rows = run_small(small_shapes, args.small_runs, max(1, args.small_repeat),
                               args.timeout, node, run_reference)
        print()

    py_results: dict[tuple[str, int], CaseResult] = {}
    ref_results: dict[tuple[str, int], CaseResult] = {}
    rows: list[tuple[str, int, CaseResult | None, CaseResult | None]] = []
    for shape in shapes:
        for n in sizes:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", shape, str(n)]
            print(f"  python    {shape:5} {n:>7,} ...", end=" ", flush=True)
            py = run_case(cmd, repeat, args.timeout)
            print(_progress(py, n), flush=True)
            py_results[(shape, n)] = py
            ref: CaseResult | None = None
            if run_reference and n <= args.reference_max_n:
                cmd = [node, f"--max-old-space-size={args.node_heap_mb}",  # type: ignore[list-item]
                       str(REFERENCE_SCRIPT), shape, str(n)]
                print(f"  reference {shape:5} {n:>7,} ...", end=" ", flush=True)
                ref = run_case(cmd, repeat, args.timeout)
                print(_progress(ref, n), flush=True)
                ref_results[(shape, n)] = ref
            rows.append((shape, n, py, ref))

    if rows:
        print()
        print_table(rows)
    failures = [(who, shape, n, r) for who, results in (("python", py_results),
                                                        ("reference", ref_results))
                for (shape, n), r in results.items() if not r.ok]
    if failures:
        print("\nNot completed (RSS in parentheses is the peak before the failure):")
        for who, shape, n, r in failures:
            print(f"  {who} {shape} {n:,}: {r.failure}: {r.detail}")
    print_targets(shapes, py_results, ref_results, not run_reference)
    print_small_targets(small_rows)

    if args.json:
        def dump(results: dict[tuple[str, int], CaseResult]) -> list[dict[str, Any]]:
            return [{"shape": s, "n": n, "ok": r.ok, "seconds": r.seconds,
                     "nodesPerSecond": r.rate(n), "peakRssBytes": r.peak_rss,
                     "failure": r.failure, "detail": r.detail, "runs": r.runs}
                    for (s, n), r in results.items()]
        Path(args.json).write_text(json.dumps({"python": dump(py_results),
                                               "reference": dump(ref_results),
                                               "small": small_rows}, indent=2),
                                   encoding="utf-8")
    return 0


def _progress(result: CaseResult, n: int) -> str:
    if not result.ok:
        return f"{result.failure}: {result.detail}"
    return (f"{result.seconds:.3f} s, {result.rate(n):,.0f} nodes/s, "
            f"peak RSS {(result.peak_rss or 0) / MIB:,.0f} MB")


if __name__ == "__main__":
    sys.exit(main())  # the driver always returns 0; a --worker returns 1 when its case failed
