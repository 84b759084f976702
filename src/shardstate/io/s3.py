"""S3-compatible object storage: ranged reads straight into a caller's buffer (the engine's only way to
an object's bytes: `ObjectFile`, `RemoteFiles`), listing, and uploads. Endpoint, region and credentials
come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION...). Every failure is a ShardstateError naming the object: unreachable endpoint, refused
credentials, missing object, an object shorter than expected, a server gone mid-transfer (after bounded
retries and time-outs).

botocore's own checksums are off where they would only add work: the manifest's sizes and checksums are
what fetched bytes are checked against."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardstate.errors import ShardstateError, brief

SCHEME = "s3://"
READ_BLOCK = 1 << 20  # readinto granularity within a GET
DEFAULT_RANGES = 8  # parallel GETs per file
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
ATTEMPTS = 4  # botocore's retries, with its exponential backoff
SMALL_OBJECT_LIMIT = 64 << 20  # an object read whole into memory (config, tokenizer, index, side files)
CACHE_TODO = "free space in the cache directory (--cache-dir), or choose another"


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str  # the server's version tag: every ranged GET asks for exactly this version (If-Match)


def is_s3(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing "/"; "" for the bucket's root

    @classmethod
    def parse(cls, location: str) -> S3Location:
        """Refused before any request unless it names one bucket and one prefix exactly: a server (or boto3)
        would fold `//` and dot segments into another key than the one written, and a control character
        would split the error line."""
        problem = _location_problem(location)
        if problem:
            raise ShardstateError(f"{brief(location, 200)} is not an s3://bucket/prefix location ({problem})", None,
                                  "write it as s3://bucket/prefix")
        bucket, _, prefix = location.removeprefix(SCHEME).partition("/")
        return cls(bucket, prefix.removesuffix("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str | None = None) -> str:
        base = f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"
        return base if name is None else f"{base}/{name}"


BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules for bucket names
IP_ADDRESS = re.compile(r"\d+\.\d+\.\d+\.\d+")
MAX_PREFIX_BYTES = 900  # S3 keys are at most 1024 bytes: room for the file names below the prefix


def _location_problem(location: str) -> str | None:
    """Why `location` is not a plain s3://bucket/prefix, or None."""
    if not is_s3(location):
        return "it does not start with s3://"
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        return "a control character"
    bucket, _, prefix = location.removeprefix(SCHEME).partition("/")
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket or IP_ADDRESS.fullmatch(bucket):
        return f"{brief(bucket)} is not a valid bucket name"
    if "//" in location.removeprefix(SCHEME):
        return "an empty path segment '//'"
    if any(segment in (".", "..") for segment in prefix.split("/")):
        return "a '.' or '..' segment"
    if len(prefix.encode()) > MAX_PREFIX_BYTES:
        return f"a prefix of {len(prefix.encode())} bytes, over {MAX_PREFIX_BYTES}"
    return None


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ShardstateError("s3:// locations need boto3, which is not installed", None,
                              "pip install 'shardstate[s3]'") from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        max_pool_connections=64,  # `upload --parallel` goes to 64
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except ValueError as exc:  # e.g. an AWS_ENDPOINT_URL without a scheme
        raise ShardstateError(f"cannot use the S3 endpoint {os.environ.get('AWS_ENDPOINT_URL')!r} ({exc})", None,
                              "set AWS_ENDPOINT_URL to a URL such as http://host:port") from None


def _failure(exc: BaseException, url: str) -> ShardstateError:
    """One line for what went wrong with `url`."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    if isinstance(exc, ShardstateError):
        return exc
    if isinstance(exc, NoCredentialsError):
        return ShardstateError("no S3 credentials", None, "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, EndpointConnectionError):
        return ShardstateError(f"cannot reach the S3 endpoint {endpoint} ({type(exc).__name__})", None,
                               "check AWS_ENDPOINT_URL and that the server is up")
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "404"):
            return ShardstateError(f"{url} does not exist", None, "check the location, or upload the state")
        if status == 412:
            return ShardstateError(f"{url} changed while it was read (it is not the version listed when the load "
                                   "began)", None, "load again once the upload that replaced it has finished")
        if status == 403:
            return ShardstateError(f"access to {url} refused ({code or 403})", None,
                                   "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy")
        return ShardstateError(f"S3 error {code or status} on {url}", None, "check the server's log")
    return ShardstateError(f"S3 transfer of {url} failed ({type(exc).__name__}: {str(exc)[:160]})", None,
                           f"check that the server at {endpoint} is up, then retry")


class S3Store:
    """One location's objects. Thread-safe (botocore clients are)."""

    def __init__(self, location: S3Location, client: Any = None):
        self.location = location
        self.client = client or _client()

    def at(self, prefix: str) -> S3Store:
        """Another prefix of the same bucket, through this store's client."""
        return S3Store(S3Location(self.location.bucket, prefix), self.client)

    def call(self, url: str, operation: Callable[[], Any]) -> Any:
        try:
            return operation()
        except Exception as exc:  # botocore's hierarchy is wide: every failure becomes one line
            raise _failure(exc, url) from None

    def head(self, name: str) -> ObjectInfo:
        key = self.location.key(name)
        head = self.call(self.location.url(name), lambda: self.client.head_object(Bucket=self.location.bucket, Key=key))
        return ObjectInfo(int(head["ContentLength"]), head.get("ETag", ""))

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        url, key = self.location.url(name), self.location.key(name)
        try:
            self.client.head_object(Bucket=self.location.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise _failure(exc, url) from None
        except Exception as exc:
            raise _failure(exc, url) from None
        return True

    def metadata(self, name: str) -> dict[str, str]:
        """The object's user metadata (x-amz-meta-*), keys in lower case."""
        key = self.location.key(name)
        head = self.call(self.location.url(name), lambda: self.client.head_object(Bucket=self.location.bucket, Key=key))
        return head.get("Metadata", {})

    def read_bytes(self, name: str, limit: int = SMALL_OBJECT_LIMIT) -> bytes:
        """A small object whole (a manifest, a config or tokenizer file), refused past `limit` bytes: read
        into memory, its size must be bounded whatever the listing said (the object may since have grown)."""
        url, key = self.location.url(name), self.location.key(name)
        body = self.call(url, lambda: self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"])
        try:
            data = self.call(url, lambda: body.read(limit + 1))
        finally:
            body.close()
        if len(data) > limit:
            raise ShardstateError(f"{url} is over {limit >> 20} MiB, the limit for a file read whole", None,
                                  "only a manifest, config and tokenizer files are read whole: keep them below it")
        return data

    def objects(self) -> dict[str, ObjectInfo]:
        """Every object under the prefix, by its name relative to it."""
        prefix = self.location.key("")
        found: dict[str, ObjectInfo] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix)
        for page in self.call(self.location.url(), lambda: list(pages)):
            found.update((item["Key"][len(prefix):], ObjectInfo(int(item["Size"]), item.get("ETag", "")))
                         for item in page.get("Contents", []))
        return found

    def read_into(self, name: str, offset: int, buffer: memoryview, version: ObjectInfo | None = None) -> None:
        """Exactly len(buffer) bytes from `offset`, read straight into `buffer`; of exactly `version` of the
        object when given (its ETag, its size), so that no read mixes two versions of a replaced object."""
        url, key = self.location.url(name), self.location.key(name)
        end = offset + len(buffer) - 1
        condition = {"IfMatch": version.etag} if version is not None and version.etag else {}
        response = self.call(url, lambda: self.client.get_object(Bucket=self.location.bucket, Key=key,
                                                                 Range=f"bytes={offset}-{end}", **condition))
        total = str(version.size) if version is not None else ""
        if not str(response.get("ContentRange", "")).startswith(f"bytes {offset}-{end}/{total}"):
            response["Body"].close()  # a server that ignored the range would send other bytes than asked
            raise ShardstateError(f"{url}: asked for bytes {offset}-{end}, the server sent "
                                  f"{response.get('ContentRange') or 'the whole object'}", None,
                                  "use an S3-compatible server that honours ranged GETs")
        body, done = response["Body"], 0
        while done < len(buffer):
            got = self.call(url, lambda part=buffer[done:done + READ_BLOCK]: body.readinto(part))
            if not got:
                raise ShardstateError(f"{url} ended at byte {offset + done}, {len(buffer) - done} bytes short",
                                      None, "the object is truncated or changed: upload the state again")
            done += got

    def put(self, name: str, data: bytes, metadata: dict[str, str], if_absent: bool = False) -> None:
        """One whole object; with `if_absent`, refused (If-None-Match) where the name is already taken, so
        that of two writers starting at once only one goes on."""
        from botocore.exceptions import ClientError

        url, key = self.location.url(name), self.location.key(name)
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, Metadata=metadata, **condition)
        except ClientError as exc:
            if if_absent and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                raise ShardstateError(f"{url} appeared while this upload began (another upload to the same place?)",
                                      None, "let that one finish, or upload to another prefix") from None
            raise _failure(exc, url) from None
        except Exception as exc:
            raise _failure(exc, url) from None

    def delete(self, name: str) -> None:
        key = self.location.key(name)
        self.call(self.location.url(name), lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def start_multipart(self, name: str, metadata: dict[str, str]) -> str:
        """A new multipart upload of `name`: its upload id. The object appears only once it is completed."""
        key = self.location.key(name)
        return self.call(self.location.url(name), lambda: self.client.create_multipart_upload(
            Bucket=self.location.bucket, Key=key, Metadata=metadata))["UploadId"]

    def put_part(self, name: str, upload_id: str, number: int, data: bytes) -> str:
        """Part `number` (from 1) of a multipart upload: its ETag, for completing."""
        key = self.location.key(name)
        return self.call(self.location.url(name), lambda: self.client.upload_part(
            Bucket=self.location.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data))["ETag"]

    def complete_multipart(self, name: str, upload_id: str, etags: list[str]) -> None:
        key = self.location.key(name)
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
        self.call(self.location.url(name), lambda: self.client.complete_multipart_upload(
            Bucket=self.location.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))

    def abort_multipart(self, name: str, upload_id: str) -> None:
        key = self.location.key(name)
        self.call(self.location.url(name), lambda: self.client.abort_multipart_upload(
            Bucket=self.location.bucket, Key=key, UploadId=upload_id))

    def multipart_uploads(self) -> list[tuple[str, str]]:
        """The multipart uploads open under the prefix: (name relative to it, upload id)."""
        prefix = self.location.key("")
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.location.bucket,
                                                                            Prefix=prefix)
        return [(item["Key"][len(prefix):], item["UploadId"])
                for page in self.call(self.location.url(), lambda: list(pages)) for item in page.get("Uploads", [])]


_stores: dict[tuple[str | None, ...], S3Store] = {}
_stores_lock = threading.Lock()


def store_for(location: S3Location) -> S3Store:
    """This process's one S3Store (and client) per endpoint, credentials and location."""
    key = (*(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")), location.url())
    with _stores_lock:
        if key not in _stores:
            _stores[key] = S3Store(location)
        return _stores[key]


def connect_in_background(location: S3Location) -> None:
    """Make this process's client for `location` in a thread now (importing boto3 and setting up a client
    take about half a second), so that it is ready by the first request: `store_for` waits for it. A
    failure here is left to that first request to report."""

    def connect() -> None:
        with contextlib.suppress(ShardstateError):
            store_for(location)

    threading.Thread(target=connect, name="shardstate-s3-connect", daemon=True).start()


class ObjectFile:
    """One object as a FileReader (io/storage.py): each read one ranged GET straight into the buffer."""

    remote = True

    def __init__(self, store: S3Store, name: str, version: ObjectInfo, parallel: int = DEFAULT_RANGES):
        self.store, self.name, self.version, self.parallel = store, name, version, parallel
        self.size = version.size
        self.where = store.location.url(name)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        length = max(0, min(len(buffer), self.size - offset))
        if length:
            self.store.read_into(self.name, offset, buffer[:length], self.version)
        return length

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RemoteFiles:
    """Files of `root` (a node cache directory) whose bytes are still objects under `url`, by name.
    Picklable (workers receive it); each process opens its own client."""

    root: Path
    url: str  # s3://bucket/prefix
    objects: dict[str, ObjectInfo]
    parallel: int  # ranged GETs in flight per file

    def holds(self, path: Path) -> bool:
        return path.parent == self.root and path.name in self.objects

    def open(self, path: Path) -> ObjectFile:
        return ObjectFile(store_for(S3Location.parse(self.url)), path.name, self.objects[path.name], self.parallel)
