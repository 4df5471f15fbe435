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
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# -- Azure emulators and Redis (child processes) ---------------------------------------------

AZURITE_ACCOUNT = "devstoreaccount1"
# The public development keys of Azurite and of the Cosmos DB emulator (not secrets).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
COSMOS_EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)
_REPO_TOOLS = Path(__file__).resolve().parents[2] / "tools" / "local-services"


def node_tools_dir() -> Path:
    """Where ``scripts/setup`` installed the npm emulators (``FLOWCRAFT_LOCAL_SERVICES_DIR``
    overrides)."""
    configured = os.environ.get("FLOWCRAFT_LOCAL_SERVICES_DIR")
    return Path(configured) if configured else _REPO_TOOLS


def node_binary(name: str) -> str:
    candidate = node_tools_dir() / "node_modules" / ".bin" / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise RuntimeError(
        f"{name} is not installed: run scripts/setup (it installs the local emulators from "
        f"{node_tools_dir() / 'package-lock.json'})"
    )


class LocalProcess:
    """A service started as a child process on a port; ``restart()`` keeps the port."""

    def __init__(self, name: str, command: list[str], port: int, log_dir: Path) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port(self.port, timeout)
        except TimeoutError:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass(frozen=True)
class AzureEndpoints:
    storage_connection_string: str
    cosmos_url: str
    cosmos_key: str
    redis_url: str

    @property
    def cosmos_connection_string(self) -> str:
        return f"AccountEndpoint={self.cosmos_url}/;AccountKey={self.cosmos_key};"

    def environment(self) -> dict[str, str]:
        """Variables for the CLI, workers and JavaScript clients (TLS checks off for the
        local Cosmos server only)."""
        return {
            "AZURE_STORAGE_CONNECTION_STRING": self.storage_connection_string,
            "COSMOS_DB_CONNECTION_STRING": self.cosmos_connection_string,
            "COSMOS_DB_VERIFY_TLS": "false",
            "REDIS_CONNECTION_STRING": self.redis_url,
        }


@dataclass
class AzureServices:
    endpoints: AzureEndpoints
    azurite: LocalProcess
    cosmos: LocalProcess
    redis: LocalProcess


def azurite_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    port = port or free_port()
    return LocalProcess("azurite", [
        node_binary("azurite-queue"), "--queueHost", "127.0.0.1", "--queuePort", str(port),
        "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent",
    ], port, log_dir)


def cosmos_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    port = port or free_port()
    binary = node_binary("cosmosdb-server")
    check_cosmos_patched(binary)
    return LocalProcess("cosmosdb-server", [binary, "--host", "127.0.0.1", "-p", str(port)],
                        port, log_dir)


COSMOS_PATCH_MARK = "flowcraft: only system properties are refused"


def check_cosmos_patched(binary: str) -> None:
    """Refuse a Cosmos server without the install-time patch of ``tools/local-services``:
    as published it refuses patches of context keys such as ``_outputs.x``."""
    handler = Path(binary).resolve().parent / "handler" / "_patch-operations.js"
    if handler.exists() and COSMOS_PATCH_MARK in handler.read_text(encoding="utf-8"):
        return
    raise RuntimeError(
        f"the local Cosmos DB server at {binary} is not patched to accept patches of "
        "properties starting with '_': run scripts/setup (npm ci in tools/local-services "
        "applies tools/local-services/patch-cosmosdb-server.js)")


def redis_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed: run scripts/setup")
    port = port or free_port()
    return LocalProcess("redis", [server, "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"], port, log_dir)


@contextlib.contextmanager
def azure_services(log_dir: Path | None = None) -> Iterator[AzureServices]:
    """Azurite (queues), a Cosmos DB SQL API server and Redis, on free loopback ports."""
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowcraft-")))
        azurite, cosmos, redis = (azurite_process(log_dir), cosmos_process(log_dir),
                                  redis_process(log_dir))
        for process in (azurite, cosmos, redis):
            process.start()
            stack.callback(process.stop)
        storage = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};"
            f"QueueEndpoint=http://127.0.0.1:{azurite.port}/{AZURITE_ACCOUNT};"
        )
        yield AzureServices(
            AzureEndpoints(storage, f"https://127.0.0.1:{cosmos.port}", COSMOS_EMULATOR_KEY,
                           f"redis://127.0.0.1:{redis.port}/0"),
            azurite, cosmos, redis,
        )
