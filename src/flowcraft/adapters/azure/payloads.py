"""``BlobPayloadStore``: the claim check's objects in a Blob Storage container.

Large context values are kept as block blobs ``<prefix>/<runId>/<sha256>`` (see
:mod:`flowcraft.adapters.claimcheck`) in a container of the storage account the queue is
in, referred to as ``az://<container>/<name>``. Three requests: get properties (is it
there?), put and get. ``flowcraft provision azure`` creates the container; blob expiry is
a lifecycle management policy of the storage account, which only the management plane
sets (deploy/terraform/azure does).
"""

from __future__ import annotations

from typing import Any

from ...errors import FlowcraftError
from ..claimcheck import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX, DEFAULT_THRESHOLD_BYTES, PayloadStore
from ._cosmos import with_throttling_retries


class BlobPayloadStore(PayloadStore):
    """Blobs in ``container`` through an ``azure.storage.blob.aio.BlobServiceClient``."""

    scheme = "az"

    def __init__(self, blob_service_client: Any, container: str, *,
                 prefix: str = DEFAULT_PREFIX,
                 threshold_bytes: int | None = DEFAULT_THRESHOLD_BYTES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(container, prefix=prefix, threshold_bytes=threshold_bytes,
                         cache_bytes=cache_bytes)
        self.client = blob_service_client

    async def exists(self, location: str, name: str) -> bool:
        blob = self.client.get_blob_client(location, name)
        return bool(await with_throttling_retries(blob.exists, what=f"looking for {name}"))

    async def put(self, location: str, name: str, data: bytes) -> None:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.storage.blob import ContentSettings

        blob = self.client.get_blob_client(location, name)
        try:
            await with_throttling_retries(
                lambda: blob.upload_blob(
                    data, overwrite=True,
                    content_settings=ContentSettings(content_type="application/json")),
                what=f"uploading {name}")
        except ResourceNotFoundError:
            raise FlowcraftError(
                f"blob container '{location}' does not exist: run `flowcraft provision "
                "azure` with FLOWCRAFT_PAYLOAD_CONTAINER set, or set "
                "FLOWCRAFT_PAYLOAD_CONTAINER to an existing container") from None

    async def get(self, location: str, name: str) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        blob = self.client.get_blob_client(location, name)

        async def download() -> bytes:
            downloader = await blob.download_blob()
            return bytes(await downloader.readall())

        try:
            return await with_throttling_retries(download, what=f"downloading {name}")
        except ResourceNotFoundError:
            return None
