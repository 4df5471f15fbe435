"""Claim check: values too large for a run's item are kept in an object store.

A run's context is one item (DynamoDB: 400 KB, Cosmos DB: 2 MB), and every write of a
node re-bills the item. With a :class:`PayloadStore` (S3 on AWS, Blob Storage on Azure)
given to :class:`~flowcraft.adapters.aws.context.DynamoDbContext` or
:class:`~flowcraft.adapters.azure.context.CosmosDbContext`, large values live beside the
item instead, and the item holds a small reference to each.

**Writing.** A value written to a context — a node's output, a context key, one of the
initial values of ``create`` — whose JSON encoding (UTF-8, compact separators) is larger
than ``threshold_bytes`` (4 KiB unless set; ``None``: never) is uploaded first, as that
encoding, under ``<prefix>/<runId>/<sha256 of the encoding>``. The item holds in its place::

    {"$flowcraftRef": "s3://bucket/flowcraft/ord-7/5f1c…", "bytes": 182311, "sha256": "5f1c…"}

(``az://container/flowcraft/ord-7/5f1c…`` on Azure: the container of the storage account
the worker is configured with). The object's name is its content's hash, so writing the
same value again — a redelivered job's commit, a retried write, another worker's run of
the same node — names the same object: the store asks whether it is there before
uploading (a HEAD, far cheaper than a PUT) and uploads only if it is not, and a process
remembers the objects it uploaded or read and skips even that question. Objects are
uploaded before the item is written, so an item never refers to an object that is not
there yet; a write the service then refuses (a lost lease, the item limit) leaves an
object nothing refers to, which expires with the store's lifecycle rule.

Not claim-checked: the engine's records, leases and attempt counts (``_flowcraft.node.*``,
``_flowcraft.lock.*``, ``_flowcraft.attempts.*``), which the stores' conditions look
inside; small values; and values JSON cannot encode (the backend refuses those as
before). A written value that itself has the shape of a reference is always stored as an
object, so it reads back as it was written.

**Reading.** Every read that returns the context (``load``, ``claim``, ``commit``,
``apply``, and ``get`` / ``to_dict`` over them) returns the values themselves: the
references are resolved, in parallel, through a bounded in-process cache keyed by sha256
(an object never changes; ``cache_bytes``, 64 MiB unless set); concurrent readers of one
object share one download. Each value is decoded anew, so callers never share one. A
download is checked against its hash. A reference whose
object is gone raises :class:`PayloadMissingError` naming the run, the key, the object and
what to do; one read by a context without a store raises :class:`PayloadStoreMissingError`.

The TypeScript library's workers and clients do not read references: a deployment that
mixes them with Python workers keeps the claim check off.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..context import PatchOperation
from ..errors import FlowcraftError

REFERENCE_KEY = "$flowcraftRef"
"""The key naming the object in a reference (its other keys: ``bytes`` and ``sha256``)."""
DEFAULT_THRESHOLD_BYTES = 4 * 1024
DEFAULT_PREFIX = "flowcraft"
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
KNOWN_OBJECTS = 10_000
"""How many object names a store remembers as present (so it need not ask again)."""
INLINE_PREFIXES = ("_flowcraft.node.", "_flowcraft.lock.", "_flowcraft.attempts.")
"""Keys whose values stay in the item: the stores' conditions read inside them."""


class PayloadMissingError(FlowcraftError):
    """A context refers to an object that its store no longer has (or will not give)."""

    def __init__(self, run_id: str, key: str, uri: str, reason: str) -> None:
        super().__init__(
            f"run '{run_id}': context key '{key}' refers to {uri}, which {reason}. The value "
            f"was too large for the run's item and was kept there; objects expire with the "
            "store's lifecycle rule (the run retention, 30 days unless changed). Restore "
            "the object (same name and content), or give up the run: cancel it, or start "
            "it again under a new run id",
            run_id=run_id)
        self.key = key
        self.uri = uri


class PayloadStoreMissingError(FlowcraftError):
    """A context refers to an object, but it was opened without a payload store."""

    def __init__(self, run_id: str, key: str, uri: str) -> None:
        super().__init__(
            f"run '{run_id}': context key '{key}' refers to {uri}, but this process has no "
            "payload store configured to read it; configure the one the workers use "
            "(FLOWCRAFT_PAYLOAD_BUCKET on AWS, FLOWCRAFT_PAYLOAD_CONTAINER on Azure)",
            run_id=run_id)
        self.key = key
        self.uri = uri


@dataclass(frozen=True, slots=True)
class Upload:
    """An object to upload before the item that refers to it is written."""

    location: str
    name: str
    data: bytes
    sha256: str


def encoding(value: Any) -> bytes | None:
    """The value's JSON encoding as it is stored, or ``None`` for a value that is small by
    nature (a number, a boolean, null) or that JSON cannot encode (left to the backend)."""
    if value is None or isinstance(value, bool | int | float):
        return None
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return None


def is_reference(value: Any) -> bool:
    """Whether a stored value is a reference (and not a value in its own right)."""
    return (isinstance(value, Mapping) and len(value) == 3
            and isinstance(value.get(REFERENCE_KEY), str)
            and isinstance(value.get("sha256"), str)
            and isinstance(value.get("bytes"), int) and not isinstance(value.get("bytes"), bool))


class _ByteCache:
    """Least recently used bytes by sha256, at most ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, sha256: str) -> bytes | None:
        data = self._items.get(sha256)
        if data is not None:
            self._items.move_to_end(sha256)
        return data

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit or sha256 in self._items:
            return
        self._items[sha256] = data
        self.size += len(data)
        while self.size > self.limit:
            _, evicted = self._items.popitem(last=False)
            self.size -= len(evicted)


class PayloadStore(abc.ABC):
    """An object store for a context's large values (see the module docstring).

    A subclass supplies the three service calls; this class decides what is claim-checked,
    names the objects, writes and reads the references and keeps the cache. One store is
    shared by every context of a worker (its cache and its memory of present objects are).

    Args:
        location: the bucket (S3) or container (Blob Storage) new objects go to.
        prefix: the objects' names start with ``<prefix>/``: a lifecycle rule and an access
            policy can be scoped to it.
        threshold_bytes: values whose JSON encoding is larger are uploaded; ``None`` never
            uploads (references already stored are still read).
        cache_bytes: the cache of objects read or written, in bytes.
    """

    scheme: ClassVar[str]
    """The scheme of the objects' URIs: ``s3``, ``az``."""

    def __init__(self, location: str, *, prefix: str = DEFAULT_PREFIX,
                 threshold_bytes: int | None = DEFAULT_THRESHOLD_BYTES,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if not location:
            raise ValueError("a payload store needs a bucket or container name")
        if threshold_bytes is not None and threshold_bytes < 0:
            raise ValueError(f"threshold_bytes must be >= 0 or None, not {threshold_bytes}")
        self.location = location
        self.prefix = prefix.strip("/")
        self.threshold_bytes = threshold_bytes
        self._cache = _ByteCache(cache_bytes)
        self._present: OrderedDict[str, None] = OrderedDict()
        self._downloads: dict[tuple[str, str], asyncio.Task[bytes | None]] = {}
        """Downloads under way, so concurrent readers of one object share one request."""

    # -- the service ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def exists(self, location: str, name: str) -> bool:
        """Whether the object is there (``False`` also where the service will not tell)."""

    @abc.abstractmethod
    async def put(self, location: str, name: str, data: bytes) -> None:
        """Store the object (replacing one of the same name: same name, same content)."""

    @abc.abstractmethod
    async def get(self, location: str, name: str) -> bytes | None:
        """The object's content; ``None`` when it does not exist."""

    def missing_reason(self) -> str:
        """Why a read may find no object, in the words of :class:`PayloadMissingError`."""
        return "does not exist"

    # -- names ---------------------------------------------------------------------------------

    def uri(self, location: str, name: str) -> str:
        return f"{self.scheme}://{location}/{name}"

    def parse(self, uri: str) -> tuple[str, str] | None:
        """``(location, name)`` of an object URI of this store's scheme."""
        scheme, separator, rest = uri.partition("://")
        location, slash, name = rest.partition("/")
        if scheme != self.scheme or not separator or not slash or not location or not name:
            return None
        return location, name

    def object_name(self, run_id: str, sha256: str) -> str:
        return f"{self.prefix}/{run_id}/{sha256}" if self.prefix else f"{run_id}/{sha256}"

    # -- writing -------------------------------------------------------------------------------

    def plan(self, run_id: str, key: str, value: Any) -> tuple[Any, Upload | None]:
        """What to store for ``key``: the value itself, or a reference and its upload."""
        if key.startswith(INLINE_PREFIXES):
            return value, None
        data = encoding(value)
        if data is None:
            return value, None
        if not is_reference(value) and (self.threshold_bytes is None
                                               or len(data) <= self.threshold_bytes):
            return value, None
        sha256 = hashlib.sha256(data).hexdigest()
        name = self.object_name(run_id, sha256)
        reference = {REFERENCE_KEY: self.uri(self.location, name), "bytes": len(data),
                     "sha256": sha256}
        return reference, Upload(self.location, name, data, sha256)

    async def upload(self, uploads: Sequence[Upload]) -> None:
        """Upload what is not there yet (see the module docstring), in parallel."""
        await asyncio.gather(*(self._upload(upload) for upload in uploads))

    async def _upload(self, upload: Upload) -> None:
        known = f"{upload.location}/{upload.name}"
        if known not in self._present and not await self.exists(upload.location, upload.name):
            await self.put(upload.location, upload.name, upload.data)
        self._remember(known)
        self._cache.put(upload.sha256, upload.data)

    def _remember(self, known: str) -> None:
        self._present[known] = None
        self._present.move_to_end(known)
        while len(self._present) > KNOWN_OBJECTS:
            self._present.popitem(last=False)

    # -- reading -------------------------------------------------------------------------------

    async def read(self, run_id: str, key: str, reference: Mapping[str, Any]) -> Any:
        """The value a reference stands for."""
        uri, sha256 = str(reference[REFERENCE_KEY]), str(reference["sha256"])
        data = self._cache.get(sha256)
        if data is None:
            where = self.parse(uri)
            if where is None:
                raise FlowcraftError(
                    f"run '{run_id}': context key '{key}' refers to {uri}, which this "
                    f"worker's store ({self.scheme}://{self.location}) cannot read",
                    run_id=run_id)
            data = await self._download(*where)
            if data is None:
                raise PayloadMissingError(run_id, key, uri, self.missing_reason())
            if hashlib.sha256(data).hexdigest() != sha256:
                raise FlowcraftError(
                    f"run '{run_id}': context key '{key}' refers to {uri}, whose content does "
                    f"not match its sha256 {sha256}: the object was changed after it was "
                    "written; restore its original content", run_id=run_id)
            self._cache.put(sha256, data)
            self._remember("/".join(where))
        return json.loads(data)

    async def _download(self, location: str, name: str) -> bytes | None:
        key = (location, name)
        task = self._downloads.get(key)
        if task is None:
            task = asyncio.ensure_future(self.get(location, name))
            self._downloads[key] = task

            def done(finished: asyncio.Task[bytes | None]) -> None:
                self._downloads.pop(key, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved here too: every reader may be gone

            task.add_done_callback(done)
        # Shielded: one reader cancelled (its job stopped) does not fail the others.
        return await asyncio.shield(task)


def plan_values(store: PayloadStore | None, run_id: str,
                values: Mapping[str, Any]) -> tuple[dict[str, Any], list[Upload]]:
    """The values to store in an item (large ones replaced by references) and the uploads
    to make first; unchanged without a store."""
    if store is None:
        return dict(values), []
    stored: dict[str, Any] = {}
    uploads: list[Upload] = []
    for key, value in values.items():
        stored[key], upload = store.plan(run_id, key, value)
        if upload is not None:
            uploads.append(upload)
    return stored, uploads


async def offload(store: PayloadStore | None, run_id: str,
                  operations: Sequence[PatchOperation]) -> list[PatchOperation]:
    """The operations with large values replaced by references, once their objects are
    uploaded; unchanged without a store."""
    if store is None:
        return list(operations)
    result: list[PatchOperation] = []
    uploads: list[Upload] = []
    for operation in operations:
        if operation.op != "set":
            result.append(operation)
            continue
        value, upload = store.plan(run_id, operation.key, operation.value)
        if upload is not None:
            uploads.append(upload)
            operation = PatchOperation("set", operation.key, value)
        result.append(operation)
    await store.upload(uploads)
    return result


async def resolve(store: PayloadStore | None, run_id: str,
                  data: dict[str, Any] | None) -> dict[str, Any] | None:
    """``data`` with every reference replaced by its value (in place, and returned)."""
    if data is None:
        return None
    found = [(key, value) for key, value in data.items() if is_reference(value)]
    if not found:
        return data
    if store is None:
        key, value = found[0]
        raise PayloadStoreMissingError(run_id, key, str(value[REFERENCE_KEY]))
    values = await asyncio.gather(*(store.read(run_id, key, value) for key, value in found))
    for (key, _), value in zip(found, values, strict=True):
        data[key] = value
    return data
