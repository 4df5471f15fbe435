"""``S3PayloadStore``: the claim check's objects in an S3 bucket.

Large context values are kept as objects ``<prefix>/<runId>/<sha256>`` (see
:mod:`flowcraft.adapters.claimcheck`), referred to as ``s3://<bucket>/<name>``. Three
requests: ``HeadObject`` (is it there?), ``PutObject`` and ``GetObject``; the workers need
``s3:GetObject`` and ``s3:PutObject`` on ``<bucket>/<prefix>/*``, and ``s3:ListBucket`` on
the bucket for S3 to answer 404 rather than 403 for an object that is not there (without
it, an object is uploaded again when a worker cannot tell, and a missing one reads as
access denied). ``flowcraft provision aws`` creates the bucket with a lifecycle rule that
expires the objects with the runs.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from ...errors import FlowcraftError
from ..claimcheck import DEFAULT_CACHE_BYTES, DEFAULT_PREFIX, DEFAULT_THRESHOLD_BYTES, PayloadStore

NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


def _status(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status)


class S3PayloadStore(PayloadStore):
    """Objects in ``bucket`` through an aiobotocore S3 client (``s3_client``)."""

    scheme = "s3"

    def __init__(self, s3_client: Any, bucket: str, *, prefix: str = DEFAULT_PREFIX,
                 threshold_bytes: int | None = DEFAULT_THRESHOLD_BYTES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(bucket, prefix=prefix, threshold_bytes=threshold_bytes,
                         cache_bytes=cache_bytes)
        self.client = s3_client

    async def exists(self, location: str, name: str) -> bool:
        try:
            await self.client.head_object(Bucket=location, Key=name)
        except ClientError as exc:
            code, status = _status(exc)
            if code in NOT_FOUND or status in (403, 404):
                return False  # 403: not allowed to tell (no s3:ListBucket); upload it
            raise
        return True

    async def put(self, location: str, name: str, data: bytes) -> None:
        try:
            await self.client.put_object(Bucket=location, Key=name, Body=data,
                                         ContentType="application/json")
        except ClientError as exc:
            if _status(exc)[0] == "NoSuchBucket":
                raise FlowcraftError(
                    f"S3 bucket '{location}' does not exist: run `flowcraft provision aws` "
                    "with FLOWCRAFT_PAYLOAD_BUCKET set, or set FLOWCRAFT_PAYLOAD_BUCKET to "
                    "an existing bucket") from None
            raise

    async def get(self, location: str, name: str) -> bytes | None:
        try:
            response = await self.client.get_object(Bucket=location, Key=name)
        except ClientError as exc:
            code, status = _status(exc)
            if code in NOT_FOUND or code == "NoSuchBucket" or status in (403, 404):
                return None
            raise
        async with response["Body"] as stream:
            return bytes(await stream.read())

    def missing_reason(self) -> str:
        return ("does not exist (or the worker may not read it: it needs s3:GetObject on "
                "the prefix, and s3:ListBucket to be told an object is missing)")
