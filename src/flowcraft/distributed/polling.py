"""``WorkerLoop``: a worker's polling loop, which hands received messages to the job algorithm.

The loop runs ``concurrency`` jobs at once. It receives when no message it
received is still waiting for a job slot and a slot is free, and asks for the
free slots plus the messages its running jobs will have room for within
``prefetch_job_seconds`` (judged by the recent mean job time; at most
``batch_size`` in all): a busy worker fetches
several messages per receive instead of one per finished job, and a message
received ahead waits a moment at most.
The loop holds no slot while its receive is open (a long poll on an empty
queue). Each message becomes a task that:

* keeps the message invisible from its receive until the job ends
  (``set_visibility`` every third of ``lease_seconds``; a worker busy with long
  nodes is alive, so each renewal is also a heartbeat for the health check);
* waits for a job slot, then runs
  :meth:`~flowcraft.distributed.algorithm.JobAlgorithm.handle_message`;
* lends the job's commits the slots that are free then (none while a received
  message waits for one), for the successors they claim in their writes
  (:mod:`.slots`), and waits for those to end;
* acknowledges the message (``delete``) — or, when the job must wait
  (``deferred``), or failed unexpectedly (redelivered after at most 30 s),
  makes it visible again after the wait; so does a successor run in a lent
  slot that failed unexpectedly or was stopped (its redelivered job
  re-announces what was not done).

A failed receive is logged and retried after a second. :meth:`WorkerLoop.stop`
stops receiving, puts back at once the messages still waiting for a slot, lets
running jobs finish for up to the shutdown timeout, then cancels them (what
they hold is released: their messages become visible again, their leases are
dropped without counting an attempt), and finally closes the queue
(:meth:`~flowcraft.distributed.backend.JobQueue.close`: gathered
acknowledgements are sent, receives still on the wire are put back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from ..observability import heartbeat
from .algorithm import JobAlgorithm, JobOutcome
from .backend import Backend, QueueMessage
from .options import WorkerSettings

logger = logging.getLogger("flowcraft.distributed")


class WorkerLoop:
    """Polls ``backend.queue`` and runs what it receives with ``algorithm``."""

    prefetch_job_seconds: float = 2.0
    """How long a message received ahead of a free slot may expect to wait for one: a
    receive asks for the free slots plus as many more as the running jobs (at their
    recent mean duration) free within this time (at most ``batch_size`` in all). With
    long jobs that is none, so a busy worker never holds back messages an idle one
    could run."""

    def __init__(self, backend: Backend, algorithm: JobAlgorithm,
                 settings: WorkerSettings) -> None:
        self.backend = backend
        self.algorithm = algorithm
        self.settings = settings
        self._capacity = settings.concurrency
        self._active: set[asyncio.Task[Any]] = set()
        self._waiting: set[asyncio.Task[None]] = set()
        """Tasks of received messages that wait for a job slot."""
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(self._capacity)
        self._running = 0
        self._changed = asyncio.Event()
        self._mean_job_seconds = 0.0

    @property
    def poll_task(self) -> asyncio.Task[None] | None:
        """The task of the polling loop (``None`` before the first start)."""
        return self._poll_task

    @property
    def jobs(self) -> frozenset[asyncio.Task[Any]]:
        """The tasks of the received messages: jobs running now and those waiting for a slot."""
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
        """Stop polling; put back the messages still waiting for a slot; let running jobs
        finish for up to ``timeout_seconds``, then cancel them and release what they hold
        (their messages become visible again); then close the queue (see the module
        docstring)."""
        self._stopping.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        for task in list(self._waiting):
            task.cancel()  # not started: its message is made visible again at once
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
            wanted = await self._room()
            try:
                messages = await self.backend.queue.receive(wanted,
                                                            self.settings.poll_wait_seconds)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("worker %s: receiving failed; retrying in 1 s",
                                 self.settings.worker_id)
                await asyncio.sleep(1.0)
                continue
            heartbeat()
            for message in messages:
                task = asyncio.get_running_loop().create_task(self._process_message(message))
                self._active.add(task)
                self._waiting.add(task)
                task.add_done_callback(self._job_done)

    async def _room(self) -> int:
        """Wait until no received message waits for a slot and a slot is free; return how many
        messages to ask for (see the module docstring)."""
        while self._waiting or self._running >= self._capacity:
            self._changed.clear()
            await self._changed.wait()
        wanted = self._capacity - self._running
        # The k-th message received ahead starts after about k * mean / capacity seconds (the
        # running jobs end at that rate): receive ahead only as many as start within
        # prefetch_job_seconds (none before a job has ended: their length is unknown).
        mean = self._mean_job_seconds
        ahead = int(self._capacity * self.prefetch_job_seconds / mean) if mean > 0 else 0
        return max(1, min(self.settings.batch_size, wanted + ahead))

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        heartbeat()
        self._active.discard(task)
        self._waiting.discard(task)
        self._changed.set()

    async def _process_message(self, message: QueueMessage) -> None:
        keeper = asyncio.get_running_loop().create_task(self._keep_invisible(message))
        outcome: JobOutcome = "deferred"
        delay = 0.0
        lent = _LentSlots(self, message)
        try:
            await self._slots.acquire()
            task = asyncio.current_task()
            if task is not None:
                self._waiting.discard(task)
            self._running += 1
            self._changed.set()
            started = time.monotonic()
            try:
                outcome, delay = await self.algorithm.handle_message(message, slots=lent)
            finally:
                self._free_slots(1, started)
            if lent.tasks:
                # The message stays invisible until the successors its job claimed have
                # ended; if one of them did not end normally, the message comes back and
                # its redelivered job re-announces what is not done.
                while pending := [t for t in lent.tasks if not t.done()]:
                    await asyncio.wait(pending)  # successors they claim join lent.tasks
                ends = [asyncio.CancelledError() if t.cancelled() else t.result()
                        for t in lent.tasks]
                if any(end is not None for end in ends):
                    stopped = any(isinstance(end, asyncio.CancelledError) for end in ends)
                    outcome, delay = "deferred", (0.0 if stopped else
                                                  min(30.0, self.settings.lease_seconds))
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

    def _free_slots(self, count: int, started: float | None = None) -> None:
        for _ in range(count):
            self._slots.release()
        self._running -= count
        self._changed.set()
        if started is not None:  # a moving mean of how long jobs take, for _room
            seconds = time.monotonic() - started
            mean = self._mean_job_seconds
            self._mean_job_seconds = seconds if mean <= 0 else mean + 0.2 * (seconds - mean)

    async def _take_free(self, wanted: int) -> int:
        """Reserve up to ``wanted`` free slots without waiting (none while received messages
        wait for one, or while stopping)."""
        taken = 0
        while (taken < wanted and not self._stopping.is_set() and not self._waiting
               and not self._slots.locked()):
            await self._slots.acquire()  # free: returns at once
            taken += 1
        self._running += taken
        return taken

    async def _run_lent(self, job: Coroutine[Any, Any, None],
                        origin: QueueMessage) -> BaseException | None:
        """Run a successor claimed by ``origin``'s job in a slot reserved for it; return why it
        did not end normally (``None``: it did)."""
        started = time.monotonic()
        try:
            await job
        except asyncio.CancelledError as exc:
            return exc
        except Exception as exc:
            logger.exception("message %s: a successor its job claimed failed unexpectedly; "
                             "the message will be redelivered", origin.message_id)
            return exc
        finally:
            self._free_slots(1, started)
        return None

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


class _LentSlots:
    """The :class:`~flowcraft.distributed.slots.LocalSlots` of one message's job: free slots
    of the loop, and the tasks of the successors run in them."""

    def __init__(self, loop: WorkerLoop, origin: QueueMessage) -> None:
        self._loop = loop
        self._origin = origin
        self.tasks: list[asyncio.Task[BaseException | None]] = []

    async def take(self, wanted: int) -> int:
        return await self._loop._take_free(wanted)

    def give_back(self, count: int) -> None:
        if count:
            self._loop._free_slots(count)

    def run(self, job: Coroutine[Any, Any, None]) -> None:
        loop = self._loop
        task = asyncio.get_running_loop().create_task(loop._run_lent(job, self._origin))
        loop._active.add(task)
        task.add_done_callback(loop._job_done)

        def unstarted(task: asyncio.Task[BaseException | None]) -> None:
            if task.cancelled():  # cancelled (a stop) before it began: nothing ran
                job.close()
                loop._free_slots(1)

        task.add_done_callback(unstarted)
        self.tasks.append(task)
