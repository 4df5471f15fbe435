"""Local stand-ins for the cloud services, on loopback: for ``flowcraft demo``, the tests,
the benchmarks and development — never for a worker in production.

* :mod:`.aws` — a moto server (SQS, DynamoDB, S3) in this process (:func:`moto_server`);
  needs the ``local`` extra (``pip install "flowcraft-py[local]"``, which brings
  ``moto[server]``).
* :mod:`.azure` — Azurite's queue and blob services, a Cosmos DB SQL API server (npm packages;
  see that module for where they are found) and ``redis-server``, each a child process
  on a free port (:func:`azure_services`).
* :mod:`.processes` — free ports, child processes, and :class:`LocalServiceError`, the one
  error a service that cannot start raises (its message says what is missing).

Nothing in the runtime, the adapters, the workers or the client imports this package:
only the command line's demo and the test and benchmark suites do. It imports no
third-party module until a service is started, and everything started here is stopped
by the context manager that started it.
"""

from __future__ import annotations

from .aws import LOCAL_AWS_CREDENTIALS, MotoEndpoint, moto_server
from .azure import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    COSMOS_EMULATOR_KEY,
    COSMOS_PATCH_MARK,
    LOCAL_SERVICES_DIR_VARIABLE,
    AzureEndpoints,
    AzureServices,
    azure_services,
    azurite_blob_process,
    azurite_process,
    check_cosmos_patched,
    cosmos_process,
    node_binary,
    node_tools_dir,
    node_tools_dirs,
    redis_process,
)
from .processes import LocalProcess, LocalServiceError, free_port, wait_for_port

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "COSMOS_EMULATOR_KEY",
    "COSMOS_PATCH_MARK",
    "LOCAL_AWS_CREDENTIALS",
    "LOCAL_SERVICES_DIR_VARIABLE",
    "AzureEndpoints",
    "AzureServices",
    "LocalProcess",
    "LocalServiceError",
    "MotoEndpoint",
    "azure_services",
    "azurite_blob_process",
    "azurite_process",
    "check_cosmos_patched",
    "cosmos_process",
    "free_port",
    "moto_server",
    "node_binary",
    "node_tools_dir",
    "node_tools_dirs",
    "redis_process",
    "wait_for_port",
]
