"""A live view of distributed runs in the browser (``flowcraft ui aws|azure``).

:mod:`.source` reads runs from an adapter, :mod:`.app` serves the JSON API and the page,
``assets/`` holds the page (plain HTML, CSS and JavaScript shipped in the wheel). What a
run looks like is decided in :mod:`flowcraft.runview`. Needs ``flowcraft-py[ui]``.
"""

from __future__ import annotations

from .source import AdapterRunSource, BadRequest, RunPage, RunSource, cancel_run

__all__ = ["AdapterRunSource", "BadRequest", "RunPage", "RunSource", "cancel_run"]
