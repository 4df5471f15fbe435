"""Local Azure: Azurite's queue and blob services, a Cosmos DB SQL API server and
``redis-server``, each a child process on a free loopback port (:func:`azure_services`).
The storage connection string names both Azurite endpoints, so queue and blob clients
(the claim check's) are made from the one string, as on a real storage account.

Azurite and the Cosmos DB server are npm packages, pinned by
``tools/local-services/package-lock.json`` of the source tree; ``npm ci`` there installs
them and patches the Cosmos server (as published it refuses patches of properties
starting with ``_``, such as ``_outputs.x``; :func:`check_cosmos_patched` refuses a server
without the patch). They are found, in this order, under
``$FLOWCRAFT_LOCAL_SERVICES_DIR/node_modules/.bin`` (a copy of ``tools/local-services``
anywhere, for an installed flowcraft), under the source tree's ``tools/local-services``
(a checkout or an editable install, where ``scripts/setup`` installs them), then on
``PATH``; otherwise :class:`~flowcraft.local.processes.LocalServiceError` says, in one
line, what to do. ``redis-server`` comes from ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .processes import LocalProcess, LocalServiceError, free_port

AZURITE_ACCOUNT = "devstoreaccount1"
# The public development keys of Azurite and of the Cosmos DB emulator (not secrets).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
COSMOS_EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)
LOCAL_SERVICES_DIR_VARIABLE = "FLOWCRAFT_LOCAL_SERVICES_DIR"
SOURCE_TREE_TOOLS = Path(__file__).resolve().parents[3] / "tools" / "local-services"
"""``tools/local-services`` of the source tree this package runs from (it exists only in a
checkout or an editable install)."""


def node_tools_dirs() -> list[Path]:
    """Where to look for the npm emulators, in order: ``$FLOWCRAFT_LOCAL_SERVICES_DIR``
    (when set), then the source tree's ``tools/local-services``."""
    configured = os.environ.get(LOCAL_SERVICES_DIR_VARIABLE)
    return [Path(configured), SOURCE_TREE_TOOLS] if configured else [SOURCE_TREE_TOOLS]


def node_tools_dir() -> Path:
    """The first of :func:`node_tools_dirs` with the emulators installed (the first one
    when none has them)."""
    dirs = node_tools_dirs()
    return next((path for path in dirs if (path / "node_modules" / ".bin").is_dir()), dirs[0])


def node_binary(name: str) -> str:
    """The path of an npm emulator's command (see the module docstring for the search)."""
    for directory in node_tools_dirs():
        candidate = directory / "node_modules" / ".bin" / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise LocalServiceError(
        f"{name} is not installed: run scripts/setup in a flowcraft checkout, or set "
        f"{LOCAL_SERVICES_DIR_VARIABLE} to a copy of its tools/local-services after "
        "`npm ci` there")


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
    """Azurite's queue service."""
    cosmos: LocalProcess
    redis: LocalProcess
    azurite_blob: LocalProcess
    """Azurite's blob service."""


def azurite_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    port = port or free_port()
    return LocalProcess("azurite", [
        node_binary("azurite-queue"), "--queueHost", "127.0.0.1", "--queuePort", str(port),
        "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent",
    ], port, log_dir)


def azurite_blob_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    port = port or free_port()
    return LocalProcess("azurite-blob", [
        node_binary("azurite-blob"), "--blobHost", "127.0.0.1", "--blobPort", str(port),
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
    raise LocalServiceError(
        f"the local Cosmos DB server at {binary} is not patched to accept patches of "
        "properties starting with '_': run scripts/setup (npm ci in tools/local-services "
        "applies tools/local-services/patch-cosmosdb-server.js)")


def redis_process(log_dir: Path, port: int | None = None) -> LocalProcess:
    server = shutil.which("redis-server")
    if server is None:
        raise LocalServiceError("redis-server is not installed: run scripts/setup (or install "
                                "Redis >= 6)")
    port = port or free_port()
    return LocalProcess("redis", [server, "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"], port, log_dir)


@contextlib.contextmanager
def azure_services(log_dir: Path | None = None) -> Iterator[AzureServices]:
    """Azurite (queues and blobs), a Cosmos DB SQL API server and Redis, on free loopback
    ports."""
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flowcraft-")))
        azurite, cosmos, redis, blob = (azurite_process(log_dir), cosmos_process(log_dir),
                                        redis_process(log_dir), azurite_blob_process(log_dir))
        for process in (azurite, cosmos, redis, blob):
            process.start()
            stack.callback(process.stop)
        yield AzureServices(
            AzureEndpoints(storage_connection_string(azurite.port, blob.port),
                           f"https://127.0.0.1:{cosmos.port}", COSMOS_EMULATOR_KEY,
                           f"redis://127.0.0.1:{redis.port}/0"),
            azurite, cosmos, redis, blob,
        )


def storage_connection_string(queue_port: int, blob_port: int | None = None,
                              host: str = "127.0.0.1") -> str:
    """Azurite's storage account at its queue (and blob) endpoint."""
    blob = (f"BlobEndpoint=http://{host}:{blob_port}/{AZURITE_ACCOUNT};"
            if blob_port is not None else "")
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};"
            f"QueueEndpoint=http://{host}:{queue_port}/{AZURITE_ACCOUNT};{blob}")
