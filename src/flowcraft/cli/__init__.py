"""The ``flowcraft`` command line (``flowcraft = "flowcraft.cli:main"``).

* :mod:`.main` — the parser and :func:`main`: every command's flags, and the one-line
  errors (exit status 2) every command shares.
* :mod:`.common` — :class:`UsageError`, registries, ``--context``, number flags,
  ``--blueprints DIR``, connection settings from flags.
* :mod:`.local` — ``run``, ``replay``, ``graph``, ``validate``: in this process.
* :mod:`.cloud` — ``provision``, ``start``, ``status``, ``runs``, ``cancel``, ``resume``,
  ``reconcile``, ``ui``: on a backend's services.
* :mod:`.worker` — ``worker``: a :class:`~flowcraft.worker.Worker` from the flags.
* :mod:`.demo` — ``demo``: the example order pipeline in memory or on local services
  (:mod:`flowcraft.local`), reading the workers' counts from their ``/stats``.

The command line is built on the library's public API; nothing in the library imports
it.
"""

from __future__ import annotations

from .cloud import check_run_id, parse_start_context, show_progress
from .common import UsageError, load_registry
from .main import build_parser, main
from .worker import WORKER_CALLS_PREFIX

__all__ = [
    "WORKER_CALLS_PREFIX",
    "UsageError",
    "build_parser",
    "check_run_id",
    "load_registry",
    "main",
    "parse_start_context",
    "show_progress",
]
