"""A TCP proxy for fault-injection tests: latency, resets, refused and black-holed services.

A :class:`FaultProxy` listens on a loopback port and forwards every connection to one
loopback target, byte for byte (TLS passes through untouched). Its event loop runs on a
thread of its own, so the faults it injects do not depend on what the test's own event loop
is doing; the control methods may be called from any thread and return once the change is
in effect.

Faults:

* **latency** (:meth:`FaultProxy.set_latency`): every chunk is held for a random time in
  ``[low, high]`` seconds, per direction; a chunk never overtakes the one before it, as on
  a slow link;
* **reset** (:meth:`FaultProxy.reset`): a random share of the open connections is aborted
  with a TCP RST on both sides;
* **refuse** (:meth:`FaultProxy.refuse`): the service goes down for a while: the listening
  socket is closed (connecting fails with ``ECONNREFUSED``) and every open connection is
  reset; the same port is bound again afterwards;
* **black-hole** (:meth:`FaultProxy.blackhole`): a network partition for a while: nothing
  is forwarded in either direction, new connections are accepted but not connected
  upstream; when it heals, what was held flows on, as TCP delivers after retransmitting.

Bounded: at most ``max_connections`` at once (more are reset as they arrive), at most
``max_buffered_chunks`` held per direction of a connection, and the proxy stops itself
after ``lifetime_seconds`` if nobody stopped it. Both ends are loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Direction = Literal["up", "down", "both"]
_EOF = b""


@dataclass
class ProxyStats:
    """What the proxy did (read from any thread; counters only grow)."""

    accepted: int = 0
    rejected: int = 0
    """Connections reset on arrival because ``max_connections`` were open."""
    upstream_failures: int = 0
    """Connections closed because the target could not be reached."""
    reset: int = 0
    """Connections reset by :meth:`FaultProxy.reset` or :meth:`FaultProxy.refuse`."""
    refusals: list[float] = field(default_factory=list)
    """The length of every refuse period, in order."""
    blackholes: list[float] = field(default_factory=list)
    """The length of every black-hole period, in order."""
    bytes_up: int = 0
    bytes_down: int = 0
    max_open: int = 0
    errors: list[str] = field(default_factory=list)
    """Failures of the proxy itself (e.g. the port could not be bound again)."""


def _require_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(f"the fault proxy only connects loopback addresses, not {host!r}")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN: the peer sees a reset connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One proxied connection: a reader and a writer task per direction."""

    def __init__(self, proxy: FaultProxy, client_reader: asyncio.StreamReader,
                 client_writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def run(self) -> None:
        proxy = self.proxy
        try:
            await proxy._flowing.wait()  # a black hole delays the connection upstream too
            upstream_reader, self.upstream_writer = await asyncio.open_connection(
                proxy.target_host, proxy.target_port)
        except OSError:
            proxy.stats.upstream_failures += 1
            self.reset()
            return
        if self.closed:  # reset while connecting
            _abort(self.upstream_writer)
            return
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump(self.client_reader, self.upstream_writer, "up")),
            loop.create_task(self._pump(upstream_reader, self.client_writer, "down")),
        ]
        self.tasks.update(pumps)
        results = await asyncio.gather(*pumps, return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results):
            self.reset()
        else:
            self.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: Literal["up", "down"]) -> None:
        """Forward one direction: a reader stamps each chunk with the time it is due, a
        writer sends it then (the reader goes on reading meanwhile, so latency does not
        add up over a long transfer)."""
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(
            proxy.max_buffered_chunks)

        async def read() -> None:
            last_due = 0.0
            while True:
                try:
                    chunk: bytes | None = await reader.read(proxy.chunk_size)
                except OSError:
                    chunk = None  # reset by the peer: the writer passes the reset on
                due = max(loop.time() + proxy._delay(direction), last_due)
                last_due = due
                await held.put((due, chunk))
                if not chunk:
                    return

        reading = loop.create_task(read())
        self.tasks.add(reading)
        try:
            while True:
                due, chunk = await held.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                await proxy._flowing.wait()
                if chunk is None:
                    raise ConnectionResetError(f"{direction}stream connection reset")
                if chunk == _EOF:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()
                if direction == "up":
                    proxy.stats.bytes_up += len(chunk)
                else:
                    proxy.stats.bytes_down += len(chunk)
        finally:
            reading.cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                writer.close()
        self.proxy._connections.discard(self)

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None:
                _abort(writer)
        self.proxy._connections.discard(self)


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` with fault controls.

    Use as a context manager (or :meth:`start` / :meth:`stop`); :attr:`port` is where
    clients connect. ``seed`` makes the latencies and the choice of connections to reset
    repeatable.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1",
                 name: str = "proxy", port: int = 0, seed: int | None = None,
                 max_connections: int = 256, max_buffered_chunks: int = 64,
                 chunk_size: int = 65536, lifetime_seconds: float = 900.0) -> None:
        _require_loopback(target_host)
        self.name = name
        self.target_host = target_host
        self.target_port = target_port
        self.host = "127.0.0.1"
        self.port = port
        self.max_connections = max_connections
        self.max_buffered_chunks = max_buffered_chunks
        self.chunk_size = chunk_size
        self.lifetime_seconds = lifetime_seconds
        self.stats = ProxyStats()
        self._random = random.Random(seed)
        self._latency: dict[str, tuple[float, float]] = {"up": (0.0, 0.0), "down": (0.0, 0.0)}
        self._connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"faultproxy-{name}", daemon=True)
        self._outage: asyncio.TimerHandle | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"FaultProxy({self.name}: {self.port} -> {self.target_port})"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        """Reset every connection, stop listening and end the thread (idempotent)."""
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # stopped itself meanwhile
                self._call(self._shutdown())
            self._thread.join(timeout=10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # -- faults (any thread) ---------------------------------------------------------------

    def set_latency(self, low: float, high: float | None = None, *,
                    direction: Direction = "both") -> None:
        """Hold each chunk a random ``[low, high]`` seconds (``high`` defaults to ``low``)."""
        high = low if high is None else high
        if not 0 <= low <= high:
            raise ValueError(f"latency needs 0 <= low <= high, not {low}, {high}")
        for side in ("up", "down") if direction == "both" else (direction,):
            self._latency[side] = (low, high)

    def reset(self, fraction: float = 1.0) -> int:
        """Reset a random ``fraction`` of the open connections (at least one if any is
        open and ``fraction`` > 0); returns how many."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must be within [0, 1], not {fraction}")
        return self._call(self._reset(fraction))

    def refuse(self, seconds: float) -> None:
        """Go down for ``seconds``: refuse new connections, reset the open ones."""
        self._call(self._refuse(seconds))

    def blackhole(self, seconds: float) -> None:
        """Forward nothing for ``seconds``; afterwards what was held flows on."""
        self._call(self._blackhole(seconds))

    def heal(self) -> None:
        """End a refuse or black-hole period now and take the latency away."""
        self.set_latency(0.0)
        self._call(self._end_outage())

    @property
    def faulty(self) -> bool:
        """Whether a refuse or black-hole period is in progress."""
        return self._outage is not None

    # -- on the proxy's loop ---------------------------------------------------------------

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._stopped or not self._thread.is_alive():
            coroutine.close()
            raise RuntimeError(f"{self!r} is stopped")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _delay(self, direction: Literal["up", "down"]) -> float:
        low, high = self._latency[direction]
        return self._random.uniform(low, high) if high > 0 else 0.0

    async def _start(self) -> None:
        self._flowing.set()
        await self._listen()
        self._loop.call_later(self.lifetime_seconds,
                              lambda: self._loop.create_task(self._shutdown()))

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(self, reader, writer)
        if len(self._connections) >= self.max_connections or self._server is None:
            self.stats.rejected += 1
            _abort(writer)
            return
        self.stats.accepted += 1
        self._connections.add(connection)
        self.stats.max_open = max(self.stats.max_open, len(self._connections))
        # Cancelled when the proxy stops: end quietly (asyncio logs a cancelled handler).
        with contextlib.suppress(asyncio.CancelledError):
            await connection.run()

    async def _reset(self, fraction: float) -> int:
        open_now = sorted(self._connections, key=id)
        count = min(len(open_now), max(1, round(len(open_now) * fraction))) if fraction else 0
        for connection in self._random.sample(open_now, count):
            connection.reset()
        self.stats.reset += count
        return count

    async def _refuse(self, seconds: float) -> None:
        await self._end_outage()
        self.stats.refusals.append(seconds)
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._reset(1.0)
        self._outage = self._loop.call_later(
            seconds, lambda: self._loop.create_task(self._relisten()))

    async def _relisten(self) -> None:
        self._outage = None
        for _ in range(50):  # the port is ours again at once, unless another process took it
            try:
                await self._listen()
                return
            except OSError as exc:
                error = exc
                await asyncio.sleep(0.1)
        self.stats.errors.append(f"could not listen on {self.port} again: {error}")

    async def _blackhole(self, seconds: float) -> None:
        await self._end_outage()
        self.stats.blackholes.append(seconds)
        self._flowing.clear()
        self._outage = self._loop.call_later(seconds, self._heal)

    def _heal(self) -> None:
        self._outage = None
        self._flowing.set()

    async def _end_outage(self) -> None:
        """A new outage replaces one in progress (ending it first)."""
        if self._outage is None:
            return
        self._outage.cancel()
        if not self._flowing.is_set():
            self._heal()
        elif self._server is None:
            await self._relisten()

    async def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._outage is not None:
            self._outage.cancel()
            self._outage = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self._connections):
            connection.reset()
        self._flowing.set()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)
