"""``s3://bucket/prefix``: the object store on S3 or any S3-protocol server, via aiobotocore.

- Compare-and-swap uses S3 conditional writes: ``PutObject`` with ``IfMatch=<etag>`` or
  ``IfNoneMatch='*'``; a 412 (or 409 ConditionalRequestConflict, when two conditional writes
  race) becomes ``PreconditionFailed``.
- Files at least ``MULTIPART_THRESHOLD_BYTES`` big go up as a multipart upload, one part
  (``PART_BYTES``) in memory at a time; downloads stream the body in chunks to disk.
- Endpoint, region and credentials come from the config's ``[store]`` section, falling back
  to the standard ``AWS_*`` environment variables (botocore's own lookup).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from replicas.store.base import (
    GetResult,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    ProgressCallback,
    RateLimiter,
    StoreUnavailable,
    check_if_none_match,
    check_key,
)

PART_BYTES = 8 * 1024 * 1024  # S3's minimum part is 5 MiB (except the last)
MULTIPART_THRESHOLD_BYTES = 16 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}


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
                 access_key_id: str = "", secret_access_key: str = ""):
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self._client_kwargs: dict[str, Any] = {
            "endpoint_url": endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            "region_name": region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            or "us-east-1",
            "config": AioConfig(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}),
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

    def _error(self, exc: Exception, key: str, what: str) -> Exception:
        """Map botocore's errors to the store's typed errors."""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _PRECONDITION_CODES or status == 412:
                return PreconditionFailed(f"store {self.url}: {what} {key}: condition failed ({code})")
            if code in _NOT_FOUND_CODES or status == 404:
                return NotFound(f"store {self.url}: no object {key}" if code != "NoSuchBucket"
                                else f"store {self.url}: no bucket {self.bucket!r}")
            if status >= 500 or status in (401, 403):
                return StoreUnavailable(f"store {self.url}: {what} {key}: {code} (HTTP {status})")
            return StoreUnavailable(f"store {self.url}: {what} {key}: {exc}")
        return StoreUnavailable(f"store {self.url}: {what} {key}: {type(exc).__name__}: {exc}")

    async def _call(self, what: str, key: str, op: str, **kw):
        client = await self._c()
        try:
            return await getattr(client, op)(**kw)
        except (TimeoutError, ClientError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
            raise self._error(exc, key, what) from None

    async def get(self, key: str) -> GetResult:
        resp = await self._call("get", key, "get_object", Bucket=self.bucket, Key=self._k(key))
        try:
            async with resp["Body"] as body:
                data = await body.read()
        except (TimeoutError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
            raise self._error(exc, key, "get") from None
        return GetResult(data, resp["ETag"])

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
        client = await self._c()
        out: list[ObjectInfo] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][len(self.prefix):], int(obj["Size"]), obj.get("ETag", "")))
        except (TimeoutError, ClientError, BotoCoreError, OSError, aiohttp.ClientError) as exc:
            raise self._error(exc, prefix, "list") from None
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
        size = 0
        try:
            with open(path, "wb") as f:  # noqa: ASYNC230 - writes happen in a thread below
                async with resp["Body"] as body:
                    while chunk := await body.read(DOWNLOAD_CHUNK_BYTES):
                        await asyncio.to_thread(f.write, chunk)
                        size += len(chunk)
                        if progress:
                            progress(len(chunk))
                        delay = limiter.delay_s(len(chunk), time.monotonic())
                        if delay > 0:
                            await asyncio.sleep(delay)
                await asyncio.to_thread(os.fsync, f.fileno())
        except (TimeoutError, BotoCoreError, aiohttp.ClientError) as exc:
            raise self._error(exc, key, "download") from None
        return size


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
