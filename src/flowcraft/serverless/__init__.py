"""Serverless entry points: the job algorithm for messages a platform hands over.

* :func:`flowcraft.serverless.aws.make_sqs_handler` — an AWS Lambda handler for an SQS
  event source, answering with partial batch responses;
* :func:`flowcraft.serverless.azure.make_queue_handler` — an Azure Functions queue
  trigger (without depending on the ``azure-functions`` package).

Both open their service clients, dependencies and startup hooks once, on the first
message, and keep them for the life of the process (a warm function reuses them). Each
message runs exactly the polling worker's algorithm (``handle_message``); they differ
only in how a job that must wait (``deferred``) comes back — see each module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from ..core.options import RuntimeOptions
from ..distributed.adapter import BaseDistributedAdapter
from ..worker import DependencyFactory, Hook, open_dependencies, run_hooks


class _LazyAdapter:
    """An adapter opened on first use (clients, dependencies, startup hooks), kept open."""

    def __init__(self, runtime_options: RuntimeOptions,
                 open_adapter: Callable[[], AbstractAsyncContextManager[BaseDistributedAdapter]],
                 dependencies: Mapping[str, Any] | DependencyFactory | None,
                 on_startup: Iterable[Hook]) -> None:
        self.runtime_options = runtime_options
        self._open_adapter = open_adapter
        self._dependencies = dependencies
        self._on_startup = list(on_startup)
        self._adapter: BaseDistributedAdapter | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def get(self) -> BaseDistributedAdapter:
        if self._adapter is None:
            async with contextlib.AsyncExitStack() as stack:
                self.runtime_options.dependencies.update(
                    await open_dependencies(self._dependencies, stack))
                await run_hooks(self._on_startup, self.runtime_options.dependencies)
                adapter = await stack.enter_async_context(self._open_adapter())
                self._stack, self._adapter = stack.pop_all(), adapter
        return self._adapter

    async def aclose(self) -> None:
        """Close the clients and leave the dependency factory (tests; a platform just ends
        the process)."""
        stack, self._stack, self._adapter = self._stack, None, None
        if stack is not None:
            await stack.aclose()


