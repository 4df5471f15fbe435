"""The worker options every adapter takes, as one typed set of keywords.

``BaseDistributedAdapter`` names each option as a keyword parameter; the
backend adapters accept them as ``**options: Unpack[WorkerOptions]``, so a
type checker flags a misspelt option, and :func:`check_option_names` turns it
into a ``TypeError`` that names the option and the valid ones at run time
(Python's own message names neither the valid options nor the likely fix).

:class:`WorkerSettings` holds them resolved (defaults applied): one object,
shared by a worker's job algorithm, polling loop and client side, so an option
changed on the adapter (``adapter.lease_seconds = 30``) is seen by all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict


class WorkerOptions(TypedDict, total=False):
    """Options of a worker, all optional (defaults in ``BaseDistributedAdapter``).

    ``WorkerOptions(concurrency=4, lease_seconds=30)`` builds one; pass it as
    ``SqsAdapter(..., **options)`` or ``Worker.from_env(..., **options)``.
    """

    concurrency: int
    lease_seconds: float
    max_receive_count: int
    local_continuation: bool
    status_touch_seconds: float
    poll_wait_seconds: float
    batch_size: int
    shutdown_timeout_seconds: float
    worker_id: str | None
    unknown_blueprint_grace_seconds: float
    hard_receive_limit: int | None
    map_ledger_min_items: int
    map_chunk_items: int
    lean_writes: bool


WORKER_OPTION_NAMES: frozenset[str] = frozenset(WorkerOptions.__annotations__)


def check_option_names(owner: str, options: Mapping[str, Any],
                       extra: tuple[str, ...] = ()) -> None:
    """Refuse an option no worker knows, naming it, the nearest valid name and all of them."""
    valid = sorted(WORKER_OPTION_NAMES | set(extra))
    for name in options:
        if name in WORKER_OPTION_NAMES:
            continue
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"{owner} got an unknown option {name!r}{hint}; valid options: "
                        f"{', '.join(valid)}")


@dataclass
class WorkerSettings:
    """The options of one worker, resolved (see ``BaseDistributedAdapter`` for each)."""

    concurrency: int
    lease_seconds: float
    max_receive_count: int
    local_continuation: bool
    status_touch_seconds: float
    poll_wait_seconds: float
    batch_size: int
    shutdown_timeout_seconds: float
    worker_id: str
    unknown_blueprint_grace_seconds: float
    hard_receive_limit: int
    map_ledger_min_items: int = 32
    map_chunk_items: int = 100
    lean_writes: bool = True

    @property
    def renew_interval(self) -> float:
        """How often leases and message visibility are extended: three times per lease, so
        one late renewal never lets a running node's lease or message lapse."""
        return max(0.05, self.lease_seconds / 3)
