"""``Worker``: run a distributed worker from Python, with dependencies and lifecycle hooks.

A :class:`Worker` wraps an adapter (any :class:`~flowcraft.distributed.adapter.
BaseDistributedAdapter`, or a factory that opens one with its service clients, as
:meth:`Worker.from_env` builds from the environment) and gives it a lifecycle:

* **start** (``async with worker`` or :meth:`start`): enter the dependency factory,
  run the ``on_startup`` hooks in order, open the adapter, start polling;
* **stop** (leaving the ``async with``, or :meth:`stop`): stop polling and let running
  jobs finish (the adapter's graceful stop), close the adapter, run the ``on_shutdown``
  hooks in reverse order, leave the dependency factory. What was opened is closed even
  when the graceful part is cut short.

The dependencies mapping *is* the run-time options' ``dependencies`` dict, which nodes
see as ``ctx.dependencies``: what a startup hook adds to it (a database pool opened once
per process) reaches every node, and a shutdown hook finds it there to close it.

:meth:`run` is the command line's ``flowcraft worker``: start, wait for SIGINT or SIGTERM
(or :meth:`request_stop`), stop gracefully; a second signal quits without waiting.

With ``health_port`` the worker serves its health checks, its metrics and ``/stats``: the
process's counts as JSON plus :meth:`stats` — among it ``serviceRequests``, every request
its service clients sent by ``service.Operation`` (a worker from :meth:`Worker.from_env`
always counts them; give ``calls=`` to count your own adapter's).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, Unpack

from .blueprint import WorkflowBlueprint, load_blueprints
from .distributed.adapter import BaseDistributedAdapter
from .distributed.options import WorkerOptions, check_option_names
from .observability import HealthServer, worker_ready_check
from .runtime.runtime import FlowRuntime, RuntimeOptions

logger = logging.getLogger("flowcraft.worker")

Dependencies = dict[str, Any]
Hook = Callable[[Dependencies], Awaitable[None] | None]
"""A startup or shutdown hook: gets the dependencies dict (and may change it)."""
DependencyFactory = Callable[
    [], Mapping[str, Any] | Awaitable[Mapping[str, Any]]
    | AbstractAsyncContextManager[Mapping[str, Any]]]
"""Returns the dependencies, awaits to them, or is an async context manager yielding them
(left when the worker stops)."""
AdapterFactory = Callable[[], AbstractAsyncContextManager[BaseDistributedAdapter]]
Backend = Literal["aws", "azure"]


class Worker:
    """A worker process's lifecycle around an adapter.

    Args:
        adapter: an adapter, or a factory returning an async context manager that opens
            one (its clients closed when the worker stops); a factory needs
            ``runtime_options``, the options the adapter it opens was built with.
        runtime_options: see ``adapter``; taken from the adapter when one is given.
        dependencies: objects handed to nodes as ``ctx.dependencies`` — a mapping, or a
            :data:`DependencyFactory` called at start.
        on_startup: hooks run in order before polling starts; each gets the
            dependencies dict and may add to it. A failing hook stops the start (what was
            opened is closed; no shutdown hook runs).
        on_shutdown: hooks run in reverse order after the last job finished; a failing
            hook is logged and the others still run.
        name: how :meth:`run`'s messages name the worker (the backend).
        announce: where :meth:`run` reports starting and stopping (default: the log).
        health_port: serve ``/healthz``, ``/readyz`` and ``/metrics`` on this port while the
            worker runs (``0``: any free port; ``None``: no health server).
        health_host: the health server's address (``127.0.0.1``; ``0.0.0.0`` in a pod).
        calls: the counter the adapter's service clients count their requests into
            (``service.Operation`` -> requests), shown by :meth:`stats`.
    """

    def __init__(
        self,
        adapter: BaseDistributedAdapter | AdapterFactory,
        *,
        runtime_options: RuntimeOptions | None = None,
        dependencies: Mapping[str, Any] | DependencyFactory | None = None,
        on_startup: Iterable[Hook] = (),
        on_shutdown: Iterable[Hook] = (),
        name: str | None = None,
        announce: Callable[[str], None] | None = None,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        calls: Counter[str] | None = None,
    ) -> None:
        if isinstance(adapter, BaseDistributedAdapter):
            self._adapter: BaseDistributedAdapter | None = adapter
            self._adapter_factory: AdapterFactory | None = None
            runtime_options = adapter.runtime_options
        elif callable(adapter):
            if runtime_options is None:
                raise TypeError("Worker: an adapter factory needs runtime_options= (the "
                                "options the adapter it opens is built with)")
            self._adapter, self._adapter_factory = None, adapter
        else:
            raise TypeError(f"Worker: adapter must be an adapter or a factory opening one, "
                            f"not {type(adapter).__name__}")
        self.on_startup = list(on_startup)
        self.on_shutdown = list(on_shutdown)
        for kind, hooks in (("on_startup", self.on_startup), ("on_shutdown", self.on_shutdown)):
            for hook in hooks:
                if not callable(hook):
                    raise TypeError(f"Worker: {kind} holds {hook!r}, which is not callable")
        self.runtime_options = runtime_options
        self._dependency_source = dependencies
        self.name = name or (type(self._adapter).__name__ if self._adapter else "worker")
        self._announce = announce or (lambda text: logger.info("%s", text))
        self._stack: contextlib.AsyncExitStack | None = None
        self._stop_requested = asyncio.Event()
        self.health_port = health_port
        self.health_host = health_host
        self.health: HealthServer | None = None
        """The running health server, when ``health_port`` was given."""
        self.calls = calls

    @property
    def dependencies(self) -> Dependencies:
        """What nodes get as ``ctx.dependencies`` (the live dict: hooks may change it)."""
        return self.runtime_options.dependencies

    @property
    def adapter(self) -> BaseDistributedAdapter:
        """The running adapter (opened by :meth:`start`)."""
        if self._adapter is None:
            raise RuntimeError("the worker has not started: use `async with worker` or "
                               "`await worker.start()` first")
        return self._adapter

    @classmethod
    def from_env(
        cls,
        backend: Backend,
        *,
        registry: Mapping[str, Any],
        blueprints: Mapping[str, WorkflowBlueprint] | str | Path,
        dependencies: Mapping[str, Any] | DependencyFactory | None = None,
        on_startup: Iterable[Hook] = (),
        on_shutdown: Iterable[Hook] = (),
        settings: Any = None,
        calls: Counter[str] | None = None,
        announce: Callable[[str], None] | None = None,
        health_port: int | None = None,
        health_host: str = "127.0.0.1",
        **options: Unpack[WorkerOptions],
    ) -> Worker:
        """A worker for ``"aws"`` or ``"azure"`` whose connection settings come from the
        environment variables of the setup guides (or ``settings``, an ``AwsSettings`` /
        ``AzureSettings``). ``blueprints`` is a mapping or a directory of blueprint JSON
        files; ``options`` are the :class:`WorkerOptions`; ``calls`` counts service
        requests (a new counter when not given: :meth:`stats` shows it)."""
        from .adapters import connect as backends

        check_option_names("Worker.from_env", options)
        if backend not in ("aws", "azure"):
            raise ValueError(f"unknown backend {backend!r}: use 'aws' or 'azure'")
        if isinstance(blueprints, str | Path):
            blueprints = load_blueprints(blueprints)
        runtime_options = FlowRuntime(blueprints=blueprints, registry=registry).options
        calls = calls if calls is not None else Counter()
        if backend == "aws":
            aws_settings = settings if settings is not None else backends.AwsSettings.resolve()

            def open_adapter() -> AbstractAsyncContextManager[BaseDistributedAdapter]:
                return backends.aws_adapter(aws_settings, runtime_options, calls, **options)
        else:
            azure_settings = (settings if settings is not None
                              else backends.AzureSettings.resolve())

            def open_adapter() -> AbstractAsyncContextManager[BaseDistributedAdapter]:
                return backends.azure_adapter(azure_settings, runtime_options, calls, **options)

        return cls(open_adapter, runtime_options=runtime_options, dependencies=dependencies,
                   on_startup=on_startup, on_shutdown=on_shutdown, name=backend,
                   announce=announce, health_port=health_port, health_host=health_host,
                   calls=calls)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open dependencies, run the startup hooks, open the adapter and start polling."""
        if self._stack is not None:
            raise RuntimeError("the worker is running already")
        async with contextlib.AsyncExitStack() as stack:
            await self._open_dependencies(stack)
            await run_hooks(self.on_startup, self.dependencies)
            stack.push_async_callback(self._run_shutdown_hooks)
            if self._adapter_factory is not None:
                self._adapter = await stack.enter_async_context(self._adapter_factory())
                stack.callback(setattr, self, "_adapter", None)
            await self.adapter.start()
            if self.health_port is not None:
                health = HealthServer(self.health_port, self.health_host,
                                      ready_check=worker_ready_check(self.adapter),
                                      stats=self.stats)
                await health.start()
                stack.push_async_callback(health.stop)
                stack.callback(setattr, self, "health", None)
                self.health = health
                self._announce(f"flowcraft worker: health on http://{self.health_host}:"
                               f"{health.port} (/healthz, /readyz, /metrics, /stats)")
            self._stack = stack.pop_all()

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop polling and let running jobs finish (for up to ``timeout_seconds``, the
        adapter's ``shutdown_timeout_seconds`` by default); then close the adapter, run the
        shutdown hooks and leave the dependency factory — also when cancelled meanwhile."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            await self.adapter.stop(timeout_seconds)
        finally:
            await stack.aclose()

    def stats(self) -> dict[str, Any]:
        """What the worker adds to ``/stats``: ``worker`` (its id, while it runs),
        ``backend`` (its name) and ``serviceRequests`` (``service.Operation`` -> requests
        sent, retries included; empty without a ``calls`` counter)."""
        return {"worker": self._adapter.worker_id if self._adapter else None,
                "backend": self.name, "serviceRequests": dict(self.calls or {})}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        await self.stop()

    def request_stop(self) -> None:
        """Make :meth:`run` stop gracefully (what SIGINT and SIGTERM do)."""
        self._stop_requested.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Start, work until SIGINT / SIGTERM (or :meth:`request_stop`), stop gracefully.

        A second signal while stopping quits without waiting for running jobs (their
        messages reappear after the visibility timeout); what was opened is still closed.
        Signals are handled only in the main thread (elsewhere use :meth:`request_stop`).
        """
        loop = asyncio.get_running_loop()
        installed = self._install_signals(loop, self.request_stop) if handle_signals else []
        try:
            await self.start()
            self._announce(f"flowcraft worker ({self.name}) {self.adapter.worker_id}: "
                           f"{len(self.runtime_options.blueprints)} blueprint(s), "
                           f"concurrency {self.adapter.concurrency}")
            try:
                await self._stop_requested.wait()
            finally:
                stopping = loop.create_task(self.stop())
                if installed:  # before saying so: a signal right after the line must quit
                    self._install_signals(loop, stopping.cancel)
                self._announce("flowcraft worker: stopping (finishing running jobs and the "
                               "open receive; signal again to quit at once)")
                try:
                    await stopping
                except asyncio.CancelledError:
                    if not stopping.cancelled() or _current_task_cancelling():
                        raise
                    self._announce("flowcraft worker: stopped without waiting")
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._stop_requested.clear()

    # -- helpers -----------------------------------------------------------------------------

    async def _open_dependencies(self, stack: contextlib.AsyncExitStack) -> None:
        self.dependencies.update(await open_dependencies(self._dependency_source, stack))

    async def _run_shutdown_hooks(self) -> None:
        for hook in reversed(self.on_shutdown):
            try:
                await _call(hook, self.dependencies)
            except Exception:
                logger.exception("shutdown hook %s failed; running the others", _name(hook))

    @staticmethod
    def _install_signals(loop: asyncio.AbstractEventLoop,
                         action: Callable[[], Any]) -> list[signal.Signals]:
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, action)
            except (RuntimeError, ValueError, NotImplementedError):
                break  # not the main thread (or no signals here): request_stop() only
            installed.append(signum)
        return installed


async def open_dependencies(source: Mapping[str, Any] | DependencyFactory | None,
                            stack: contextlib.AsyncExitStack) -> Mapping[str, Any]:
    """The dependencies ``source`` gives: a mapping as it is; a factory called, its result
    awaited or, when it is an async context manager, entered on ``stack``."""
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return source
    if not callable(source):
        raise TypeError(f"dependencies must be a mapping or a factory, not "
                        f"{type(source).__name__}")
    opened: Any = source()
    if hasattr(opened, "__aenter__") and hasattr(opened, "__aexit__"):
        opened = await stack.enter_async_context(opened)
    elif inspect.isawaitable(opened):
        opened = await opened
    if not isinstance(opened, Mapping):
        raise TypeError(f"the dependency factory {_name(source)} gave {type(opened).__name__}; "
                        "it must return (or yield) a mapping of name -> object")
    return opened


async def run_hooks(hooks: Iterable[Hook], dependencies: Dependencies) -> None:
    """Run startup hooks in order (a failure stops the start)."""
    for hook in hooks:
        await _call(hook, dependencies)


async def _call(hook: Callable[[Dependencies], Any], dependencies: Dependencies) -> None:
    result = hook(dependencies)
    if inspect.isawaitable(result):
        await result


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _name(value: Any) -> str:
    return getattr(value, "__qualname__", None) or repr(value)
