"""``WorkerLoop``: a worker's polling loop, which hands received messages to the job algorithm.

The loop runs ``concurrency`` jobs at once. Before each receive it takes the
free job slots (:meth:`WorkerLoop._take_slots`): one at least, then more up to
``batch_size`` — those free now, and those that running jobs give back within
``receive_gather_seconds`` (at most half the recent mean job time) — so a busy
worker asks the queue for several messages at once instead of one per
finished job. Each message becomes a task that:

* keeps the message invisible while the job runs (``set_visibility`` every
  third of ``lease_seconds``; a worker busy with long nodes is alive, so each
  renewal is also a heartbeat for the health check);
* runs :meth:`~flowcraft.distributed.algorithm.JobAlgorithm.handle_message`;
* acknowledges the message (``delete``) — or, when the job must wait
  (``deferred``), or failed unexpectedly (redelivered after at most 30 s),
  makes it visible again after the wait.

A failed receive is logged and retried after a second. :meth:`WorkerLoop.stop`
stops receiving, lets running jobs finish for up to the shutdown timeout, then
cancels them (what they hold is released: their messages become visible again,
their leases are dropped without counting an attempt), and finally closes the
queue (:meth:`~flowcraft.distributed.backend.JobQueue.close`: gathered
acknowledgements are sent, receives still on the wire are put back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..observability import heartbeat
from .algorithm import JobAlgorithm, JobOutcome
from .backend import Backend, QueueMessage
from .options import WorkerSettings

logger = logging.getLogger("flowcraft.distributed")


class WorkerLoop:
    """Polls ``backend.queue`` and runs what it receives with ``algorithm``."""

    receive_gather_seconds: float = 2.0
    """The longest a busy worker waits for more of its jobs to finish before it receives (so
    one receive fetches several messages); it waits at most half the recent mean job time,
    so a free slot idles for a fraction of a job at worst."""

    def __init__(self, backend: Backend, algorithm: JobAlgorithm,
                 settings: WorkerSettings) -> None:
        self.backend = backend
        self.algorithm = algorithm
        self.settings = settings
        self._active: set[asyncio.Task[None]] = set()
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._job_started: dict[asyncio.Task[None], float] = {}
        self._mean_job_seconds = 0.0

    @property
    def poll_task(self) -> asyncio.Task[None] | None:
        """The task of the polling loop (``None`` before the first start)."""
        return self._poll_task

    @property
    def jobs(self) -> frozenset[asyncio.Task[None]]:
        """The tasks of the jobs running now."""
        return frozenset(self._active)

    async def start(self) -> None:
        """Start polling the queue in the background (returns at once)."""
        if self._poll_task is not None and not self._poll_task.done():
            return
        self._stopping.clear()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll())
        logger.info("worker %s polling (concurrency %d)", self.settings.worker_id,
                    self.settings.concurrency)

    async def run_forever(self) -> None:
        await self.start()
        assert self._poll_task is not None
        await self._poll_task

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop polling; let running jobs finish for up to ``timeout_seconds``, then cancel
        them and release what they hold (their messages become visible again); then close
        the queue (see the module docstring)."""
        self._stopping.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        timeout = (self.settings.shutdown_timeout_seconds if timeout_seconds is None
                   else timeout_seconds)
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        logger.info("worker %s stopped", self.settings.worker_id)
        await self.backend.queue.close(self.settings.poll_wait_seconds)

    async def _poll(self) -> None:
        while not self._stopping.is_set():
            free = await self._take_slots()
            try:
                messages = await self.backend.queue.receive(free,
                                                            self.settings.poll_wait_seconds)
            except asyncio.CancelledError:
                for _ in range(free):
                    self._slots.release()
                raise
            except Exception:
                logger.exception("worker %s: receiving failed; retrying in 1 s",
                                 self.settings.worker_id)
                for _ in range(free):
                    self._slots.release()
                await asyncio.sleep(1.0)
                continue
            heartbeat()
            for _ in range(free - len(messages)):
                self._slots.release()
            for message in messages:
                task = asyncio.get_running_loop().create_task(self._process_message(message))
                self._active.add(task)
                self._job_started[task] = time.monotonic()
                task.add_done_callback(self._job_done)

    async def _take_slots(self) -> int:
        """Take one free job slot, then more up to ``batch_size``: those free now, and those
        that running jobs give back soon (see ``receive_gather_seconds``), so a busy worker asks
        the queue for several messages at once instead of one per finished job."""
        await self._slots.acquire()
        free = 1
        want = min(self.settings.batch_size, self.settings.concurrency)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        try:
            while free < want:
                if not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                    continue
                if not self._active or self._stopping.is_set():
                    break  # nothing running will give a slot back
                if deadline is None:
                    deadline = loop.time() + min(self.receive_gather_seconds,
                                                 0.5 * self._mean_job_seconds)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._slots.acquire(), remaining)
                except TimeoutError:
                    break
                free += 1
        except asyncio.CancelledError:
            for _ in range(free):
                self._slots.release()
            raise
        return free

    def _job_done(self, task: asyncio.Task[None]) -> None:
        heartbeat()
        self._active.discard(task)
        started = self._job_started.pop(task, None)
        if started is not None:  # a moving mean of how long jobs take, for _take_slots
            self._mean_job_seconds += 0.2 * (time.monotonic() - started - self._mean_job_seconds)
        self._slots.release()

    async def _process_message(self, message: QueueMessage) -> None:
        keeper = asyncio.get_running_loop().create_task(self._keep_invisible(message))
        outcome: JobOutcome = "deferred"
        delay = 0.0
        try:
            outcome, delay = await self.algorithm.handle_message(message)
        except asyncio.CancelledError:
            outcome, delay = "deferred", 0.0
            raise
        except Exception:
            logger.exception("message %s: unexpected error; it will be redelivered",
                             message.message_id)
            outcome, delay = "deferred", min(30.0, self.settings.lease_seconds)
        finally:
            keeper.cancel()
            with contextlib.suppress(Exception):
                if outcome == "deferred":
                    await self.backend.queue.set_visibility(message, delay)
                else:
                    await self.backend.queue.delete([message])

    async def _keep_invisible(self, message: QueueMessage) -> None:
        interval = self.settings.renew_interval
        while True:
            await asyncio.sleep(interval)
            heartbeat()  # a worker busy with long nodes is alive
            try:
                await self.backend.queue.set_visibility(message, self.settings.lease_seconds)
            except Exception as exc:
                logger.warning("message %s: could not extend visibility: %s",
                               message.message_id, exc)
