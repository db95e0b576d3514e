"""``s3://bucket/prefix``: the object store on S3 or any S3-protocol server, via aiobotocore.

- Compare-and-swap uses S3 conditional writes: ``PutObject`` with ``IfMatch=<etag>`` or
  ``IfNoneMatch='*'``; a 412 (or 409 ConditionalRequestConflict, when two conditional writes
  race) becomes ``PreconditionFailed``.
- Files at least ``MULTIPART_THRESHOLD_BYTES`` big go up as a multipart upload, one part
  (``PART_BYTES``) in memory at a time; downloads stream the body in chunks to disk.
- Endpoint, region and credentials come from the config's ``[store]`` section, falling back
  to the standard ``AWS_*`` environment variables (botocore's own lookup).
- Timeouts and retries (``[store] connect_timeout_s``, ``read_timeout_s``, ``max_attempts``):
  a request the server answers with a transient error (5xx, throttling, a refused or dropped
  connection) is retried up to ``max_attempts`` with jittered exponential backoff; a request
  it does not answer within the connect/read timeout is NOT retried but fails at once with
  ``StoreTimeout``: a hanging server (seen: one stopped with SIGSTOP) would otherwise cost
  attempts x timeout (botocore's own retry, which cannot tell the two apart, made
  ``geogate models list`` hang 243 s). Callers decide what a hang means: the CLI says so and
  exits, sync agents keep serving and try again next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from replicas.store.base import (
    Digest,
    GetResult,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    ProgressCallback,
    RateLimiter,
    StoreMissing,
    StoreTimeout,
    StoreUnavailable,
    check_if_none_match,
    check_key,
)

PART_BYTES = 8 * 1024 * 1024  # S3's minimum part is 5 MiB (except the last)
MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# Defaults of [store] connect_timeout_s / read_timeout_s / max_attempts (core.config).
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0  # between bytes of an answer, not for a whole transfer
MAX_ATTEMPTS = 3
RETRY_BASE_S = 0.1  # backoff before retry n: uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2**n))
RETRY_MAX_S = 2.0

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
                    "InternalError", "ServiceUnavailable"}
_TRANSIENT_STATUS = {500, 502, 503, 504}
# No answer in time: the server hangs. Checked before the connection errors (botocore's
# ConnectTimeoutError is a ConnectionError too).
_TIMEOUTS = (TimeoutError, ReadTimeoutError, ConnectTimeoutError)
_DROPPED = (EndpointConnectionError, ConnectionClosedError, aiohttp.ClientConnectionError)


def _retryable(exc: Exception) -> bool:
    """A transient error the server answered quickly (or a connection refused/dropped): worth
    another attempt. A timeout is not (see the module docstring)."""
    if isinstance(exc, _TIMEOUTS):
        return False
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS
    return isinstance(exc, _DROPPED)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"store URL {url!r}: expected s3://BUCKET[/PREFIX]")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/") if prefix else ""


class S3Store(ObjectStore):
    def __init__(self, url: str, *, endpoint_url: str = "", region: str = "",
                 access_key_id: str = "", secret_access_key: str = "",
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S,
                 max_attempts: int = MAX_ATTEMPTS):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_attempts = max(1, max_attempts)
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.endpoint = endpoint or "the AWS S3 endpoint"  # for messages
        self.region = (region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
                       or "us-east-1")
        self._client_kwargs: dict[str, Any] = {
            "endpoint_url": endpoint,
            "region_name": self.region,
            # botocore makes one attempt; _call retries what is worth retrying (module docstring).
            # ("total_max_attempts": botocore's "max_attempts" counts retries, not attempts.)
            "config": AioConfig(connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                                retries={"total_max_attempts": 1, "mode": "standard"}),
        }
        if access_key_id and secret_access_key:
            self._client_kwargs["aws_access_key_id"] = access_key_id
            self._client_kwargs["aws_secret_access_key"] = secret_access_key
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None
        self._client_lock = asyncio.Lock()

    async def _c(self):
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    self._client = await stack.enter_async_context(
                        get_session().create_client("s3", **self._client_kwargs))
                    self._stack = stack
        return self._client

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    def _k(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _missing_bucket(self) -> StoreMissing:
        return StoreMissing(f"store {self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}")

    def _error(self, exc: Exception, key: str, what: str, waited_s: float = 0.0) -> Exception:
        """Map botocore's errors to the store's typed errors."""
        if isinstance(exc, _TIMEOUTS):
            return StoreTimeout(f"store {self.url} did not answer within {waited_s:.1f} s ({what} {key}; "
                                f"{self.endpoint}; [store] connect_timeout_s = {self.connect_timeout_s:g}, "
                                f"read_timeout_s = {self.read_timeout_s:g})", waited_s=waited_s)
        if isinstance(exc, NoCredentialsError):
            return StoreUnavailable(f"store {self.url}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY (or name other variables in [store] access_key_id_env "
                                    "/ secret_access_key_env)")
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return self._missing_bucket()
            if code in _PRECONDITION_CODES or status == 412:
                return PreconditionFailed(f"store {self.url}: {what} {key}: condition failed ({code})")
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(f"store {self.url}: no object {key}")
            if status >= 500 or status in (401, 403):
                return StoreUnavailable(f"store {self.url}: {what} {key}: {code} (HTTP {status})")
            return StoreUnavailable(f"store {self.url}: {what} {key}: {exc}")
        return StoreUnavailable(f"store {self.url}: {what} {key}: {type(exc).__name__}: {exc}")

    async def _call(self, what: str, key: str, op: str, **kw):
        """One S3 request, retried (up to max_attempts) only when the server answered with a
        transient error or refused/dropped the connection; a timeout fails at once."""
        client = await self._c()
        for attempt in range(1, self.max_attempts + 1):
            started = time.monotonic()
            try:
                return await getattr(client, op)(**kw)
            except (TimeoutError, ClientError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
                if attempt == self.max_attempts or not _retryable(exc):
                    raise self._error(exc, key, what, time.monotonic() - started) from None
            await asyncio.sleep(random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** attempt)))
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _read_body(self, resp, key: str, what: str, sink) -> int:
        """Stream an answer's body in chunks into ``sink`` (an async callable); returns the size.
        A body that stops coming for read_timeout_s fails with StoreTimeout."""
        size = 0
        async with resp["Body"] as body:
            while True:
                started = time.monotonic()
                try:
                    chunk = await body.read(DOWNLOAD_CHUNK_BYTES)
                except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
                    raise self._error(exc, key, what, time.monotonic() - started) from None
                if not chunk:
                    return size
                await sink(chunk)  # its own errors (a local disk full) are not the store's
                size += len(chunk)

    async def get(self, key: str) -> GetResult:
        resp = await self._call("get", key, "get_object", Bucket=self.bucket, Key=self._k(key))
        parts: list[bytes] = []

        async def keep(chunk: bytes) -> None:
            parts.append(chunk)

        await self._read_body(resp, key, "get", keep)
        return GetResult(b"".join(parts), resp["ETag"])

    async def digest(self, key: str) -> Digest:
        resp = await self._call("read", key, "get_object", Bucket=self.bucket, Key=self._k(key))
        h = hashlib.sha256()

        async def update(chunk: bytes) -> None:
            # hashlib releases the GIL on big buffers: hashing in a thread keeps the loop free
            # (the admin API verifies versions inside a gateway process).
            await asyncio.to_thread(h.update, chunk)

        size = await self._read_body(resp, key, "read", update)
        return Digest(size, h.hexdigest())

    async def check(self) -> None:
        try:
            await self._call("check bucket", "", "head_bucket", Bucket=self.bucket)
        except NotFound:  # HEAD answers have no body: a 404 is the bucket missing
            raise self._missing_bucket() from None

    async def create(self) -> None:
        try:
            await self.check()
            return
        except StoreMissing:
            pass
        kw: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":  # S3 refuses an explicit us-east-1 constraint
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await self._call("create bucket", "", "create_bucket", **kw)
        except StoreUnavailable as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc):  # created meanwhile by us: fine
                raise

    async def put(self, key: str, data: bytes, *, if_match: str | None = None,
                  if_none_match: str | None = None) -> str:
        check_if_none_match(if_none_match)
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key), "Body": bytes(data)}
        if if_match is not None:
            kw["IfMatch"] = if_match
        if if_none_match is not None:
            kw["IfNoneMatch"] = if_none_match
        try:
            resp = await self._call("put", key, "put_object", **kw)
        except NotFound:
            # S3 answers 404 to If-Match on a missing key: for the caller that is a failed condition.
            if if_match is None:
                raise
            raise PreconditionFailed(f"store {self.url}: {key} does not exist (If-Match)") from None
        return resp["ETag"]

    async def head(self, key: str) -> ObjectInfo:
        resp = await self._call("head", key, "head_object", Bucket=self.bucket, Key=self._k(key))
        return ObjectInfo(key, int(resp["ContentLength"]), resp["ETag"])

    async def list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        while True:  # pages by hand (not botocore's paginator): each page gets _call's retries
            page = await self._call("list", prefix or "(everything)", "list_objects_v2", **kw)
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]), obj.get("ETag", "")))
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                break
            kw["ContinuationToken"] = page["NextContinuationToken"]
        out.sort(key=lambda o: o.key)
        return out

    async def delete(self, key: str) -> None:
        await self._call("delete", key, "delete_object", Bucket=self.bucket, Key=self._k(key))

    async def upload_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                          if_none_match: str | None = None) -> str:
        check_if_none_match(if_none_match)
        size = await asyncio.to_thread(os.path.getsize, path)
        if size < MULTIPART_THRESHOLD_BYTES:
            data = await asyncio.to_thread(_read_all, path)
            etag = await self.put(key, data, if_none_match=if_none_match)
            if progress:
                progress(size)
            return etag
        full_key = self._k(key)
        upload = await self._call("start upload", key, "create_multipart_upload",
                                  Bucket=self.bucket, Key=full_key)
        upload_id = upload["UploadId"]
        parts = []
        try:
            with open(path, "rb") as f:  # noqa: ASYNC230 - reads happen in a thread below
                number = 1
                while chunk := await asyncio.to_thread(f.read, PART_BYTES):
                    resp = await self._call("upload part", key, "upload_part", Bucket=self.bucket,
                                            Key=full_key, UploadId=upload_id, PartNumber=number, Body=chunk)
                    parts.append({"ETag": resp["ETag"], "PartNumber": number})
                    number += 1
                    if progress:
                        progress(len(chunk))
            kw: dict[str, Any] = {}
            if if_none_match is not None:
                kw["IfNoneMatch"] = if_none_match
            resp = await self._call("complete upload", key, "complete_multipart_upload",
                                    Bucket=self.bucket, Key=full_key, UploadId=upload_id,
                                    MultipartUpload={"Parts": parts}, **kw)
            return resp["ETag"]
        except BaseException:
            with contextlib.suppress(Exception):
                await self._call("abort upload", key, "abort_multipart_upload", Bucket=self.bucket,
                                 Key=full_key, UploadId=upload_id)
            raise

    async def download_file(self, key: str, path: str, *, progress: ProgressCallback | None = None,
                            rate_limit_bytes_per_s: int = 0) -> int:
        resp = await self._call("download", key, "get_object", Bucket=self.bucket, Key=self._k(key))
        limiter = RateLimiter(rate_limit_bytes_per_s, time.monotonic())
        with open(path, "wb") as f:  # noqa: ASYNC230 - writes happen in a thread below

            async def write(chunk: bytes) -> None:
                await asyncio.to_thread(f.write, chunk)
                if progress:
                    progress(len(chunk))
                delay = limiter.delay_s(len(chunk), time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)

            size = await self._read_body(resp, key, "download", write)
            await asyncio.to_thread(os.fsync, f.fileno())
        return size


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
