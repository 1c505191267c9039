"""The object store (S3 API: SeaweedFS here, MinIO or S3 in production) behind put/get/contains.

Only the S3 API both servers speak is used, through boto3. Conditional writes
(If-None-Match / If-Match) give compare-and-set for snapshots.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


class ObjectStoreError(RuntimeError):
    """An object-store call failed for a reason other than a missing key or a lost race."""


class ObjectNotFound(KeyError):
    """No object under that key."""


class PreconditionFailed(ObjectStoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach an S3 server. ``secret_key`` never appears in repr or logs."""

    endpoint: str  # host:port
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    secure: bool = False

    def __repr__(self) -> str:
        return f"S3Endpoint(endpoint={self.endpoint!r}, access_key=***, secure={self.secure})"

    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def client(self, max_pool: int = 16, attempts: int = 4):
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url(),
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": attempts},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=max_pool,
                # SeaweedFS and MinIO accept the SDK's default checksums, but keep
                # requests plain so any S3-compatible server takes them.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class ObjectStore:
    """One bucket of an S3 server."""

    def __init__(self, endpoint: S3Endpoint, bucket: str, client=None) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self._s3 = client if client is not None else endpoint.client()

    def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Write ``data`` under ``key``; returns the new ETag.

        ``if_none_match=True`` writes only if no object exists there; ``if_match=etag``
        only if the object still has that ETag. A lost condition raises PreconditionFailed.
        """
        if if_none_match and if_match is not None:
            raise ValueError("give if_none_match or if_match, not both")
        kwargs: dict = {"Bucket": self.bucket, "Key": key, "Body": data, "ContentType": content_type}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            return self._s3.put_object(**kwargs)["ETag"]
        except ClientError as err:
            if _status(err) in (409, 412) or _code(err) in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                raise PreconditionFailed(f"conditional write of {key!r} lost: {_code(err)}") from err
            raise ObjectStoreError(f"put {self.bucket}/{key} failed: {err}") from err

    def get(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if _code(err) in ("NoSuchKey", "404") or _status(err) == 404:
                raise ObjectNotFound(key) from err
            raise ObjectStoreError(f"get {self.bucket}/{key} failed: {err}") from err
        body = response["Body"]
        try:
            return body.read(), response["ETag"]
        finally:
            body.close()

    def contains(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as err:
            if _status(err) == 404 or _code(err) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"head {self.bucket}/{key} failed: {err}") from err

    def list(self, prefix: str = "", page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order, page by page."""
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield ObjectInfo(item["Key"], int(item["Size"]), item["ETag"])
        except ClientError as err:
            raise ObjectStoreError(f"list {self.bucket}/{prefix} failed: {err}") from err

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error (S3 semantics)."""
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            raise ObjectStoreError(f"delete {self.bucket}/{key} failed: {err}") from err

    def create_bucket(self, name: str | None = None) -> bool:
        """Create a bucket (this store's by default). True if created, False if it existed."""
        name = name or self.bucket
        try:
            self._s3.create_bucket(Bucket=name)
            return True
        except ClientError as err:
            if _code(err) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise ObjectStoreError(f"create bucket {name} failed: {err}") from err

    def list_buckets(self) -> builtins.list[str]:  # `list` here is the method above
        try:
            return [bucket["Name"] for bucket in self._s3.list_buckets().get("Buckets", [])]
        except ClientError as err:
            raise ObjectStoreError(f"list buckets failed: {err}") from err
