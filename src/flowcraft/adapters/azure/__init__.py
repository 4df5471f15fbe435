"""Azure adapter: jobs on Azure Queue Storage, run state in Cosmos DB, coordination in Redis.

Install with ``pip install "flowcraft-py[azure]"``. See ``docs/azure.md``.
"""

from .adapter import AzureQueueAdapter
from .context import CosmosDbContext
from .coordination import RedisCoordinationStore
from .provision import AzureNames, provision_azure
from .reconciler import create_azure_reconciler

__all__ = [
    "AzureNames",
    "AzureQueueAdapter",
    "CosmosDbContext",
    "RedisCoordinationStore",
    "create_azure_reconciler",
    "provision_azure",
]
