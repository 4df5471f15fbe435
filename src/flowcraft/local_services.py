"""Local stand-ins for the cloud services, on loopback, for the demo, tests and development.

* AWS: a moto server (SQS + DynamoDB) in this process (:func:`moto_server`).
* Azure: Azurite's queue service and a Cosmos DB SQL API server, both npm
  packages installed by ``scripts/setup`` under ``tools/local-services``, and
  a ``redis-server`` — each started as a child process on a free port.

Everything started here is stopped by the context managers that started it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

LOCAL_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing is listening on {host}:{port} after {timeout:g}s")


@dataclass(frozen=True)
class MotoEndpoint:
    url: str
    port: int

    def environment(self) -> dict[str, str]:
        """Variables that point AWS SDKs (Python and JavaScript) at this server."""
        return {**LOCAL_AWS_CREDENTIALS, "AWS_ENDPOINT_URL": self.url}


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[MotoEndpoint]:
    """A moto server (SQS, DynamoDB) in a background thread of this process."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the local AWS services need moto: pip install 'moto[server]' "
            "(scripts/setup installs it)"
        ) from exc
    port = port or free_port()
    # Credentials for the SDKs in this process; moto accepts any.
    for key, value in LOCAL_AWS_CREDENTIALS.items():
        os.environ.setdefault(key, value)
    # werkzeug logs every request at INFO on its own; keep the caller's output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port)
        yield MotoEndpoint(f"http://127.0.0.1:{port}", port)
    finally:
        server.stop()
