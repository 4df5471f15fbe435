"""A local AWS: a moto server (SQS, DynamoDB, S3) on a background thread of this process.

It needs the ``local`` extra (``moto[server]``). moto applies requests on threads without
a lock, which DynamoDB never does to one item; :func:`moto_server` makes its DynamoDB
handle one request at a time while the server runs (see
:func:`_serialize_moto_dynamodb`), so conditional writes behave as on AWS.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .processes import LocalServiceError, free_port, wait_for_port

LOCAL_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}

MOTO_MISSING = 'the local AWS services need the local extra: pip install "flowcraft-py[local]"'


@dataclass(frozen=True)
class MotoEndpoint:
    url: str
    port: int

    def environment(self) -> dict[str, str]:
        """Variables that point AWS SDKs (Python and JavaScript) at this server."""
        return {**LOCAL_AWS_CREDENTIALS, "AWS_ENDPOINT_URL": self.url}


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[MotoEndpoint]:
    """A moto server (SQS, DynamoDB, S3) in a background thread of this process."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise LocalServiceError(MOTO_MISSING) from None
    port = port or free_port()
    # Credentials for the SDKs in this process; moto accepts any.
    for key, value in LOCAL_AWS_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    # werkzeug logs every request at INFO on its own; keep the caller's output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    restore = _serialize_moto_dynamodb()
    server.start()
    try:
        wait_for_port(port)
        yield MotoEndpoint(f"http://127.0.0.1:{port}", port)
    finally:
        server.stop()
        restore()


def _serialize_moto_dynamodb() -> Callable[[], None]:
    """Make moto's DynamoDB apply one request at a time, as DynamoDB applies each write of
    an item atomically. moto handles requests on threads without a lock, so concurrent
    conditional updates of one item can interleave (lost updates, conditions checked
    against a half-changed item, HTTP 500 after a write was applied). Returns the undo."""
    import threading

    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    original = DynamoHandler.call_action

    def call_action(self: Any) -> Any:
        with lock:
            return original(self)

    DynamoHandler.call_action = call_action  # type: ignore[method-assign]

    def restore() -> None:
        DynamoHandler.call_action = original  # type: ignore[method-assign]

    return restore
