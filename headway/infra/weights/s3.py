"""Objects from any S3-compatible store (AWS, MinIO, Ceph, moto) through boto3.

The endpoint is the `endpoint_url` argument, else boto3's own `AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`; credentials are found the boto3 way (env, profile, instance role), and with
none at all requests go unsigned (public buckets). Byte ranges are asked with `If-Match` on the
listed ETag, so an object replaced mid-download fails loudly instead of mixing two versions.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from headway.infra.weights.errors import AccessDeniedError, BadSourceError, FetchError, SourceNotFoundError
from headway.infra.weights.remote import RemoteFile

CHUNK = 1 << 20
MAX_OBJECTS = 10_000  # a model directory; far more objects means the prefix is wrong


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/key' -> ('bucket', 'some/key'); the key may be empty or end in '/'."""
    if not url.startswith("s3://"):
        raise BadSourceError(f"'{url}' is not an s3:// URL; expected s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    bucket, _, key = url[5:].partition("/")
    if not bucket:
        raise BadSourceError(f"'{url}' names no bucket; expected s3://BUCKET/KEY or s3://BUCKET/PREFIX/")
    return bucket, key


class S3Store:
    """Lists and reads objects of one S3-compatible endpoint; thread-safe (one boto3 client)."""

    def __init__(self, endpoint_url: str | None = None, *, max_connections: int = 16,
                 client: Any = None) -> None:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if client is None:
            session = boto3.session.Session()
            config = Config(max_pool_connections=max_connections, connect_timeout=10, read_timeout=60,
                            retries={"mode": "standard", "max_attempts": 3},
                            signature_version=UNSIGNED if session.get_credentials() is None else None,
                            s3={"addressing_style": "path"} if self.endpoint else {})
            client = session.client("s3", endpoint_url=self.endpoint,
                                    region_name=session.region_name or "us-east-1", config=config)
        self.client = client
        self.where = self.endpoint or "AWS S3"

    def files(self, url: str) -> list[RemoteFile]:
        """The object `url` names, or every object under it when it is a prefix (ends in '/',
        or names no object but has objects under KEY/)."""
        bucket, key = parse_s3_url(url)
        if key and not key.endswith("/"):
            head = self._head(bucket, key)
            if head is not None:
                return [self._file(bucket, key, key.rsplit("/", 1)[-1], head["ContentLength"], head.get("ETag"),
                                   head.get("VersionId"))]
            key += "/"
        found = self._list(bucket, key)
        if not found:
            raise SourceNotFoundError(f"no object s3://{bucket}/{key.rstrip('/')} and no objects under "
                                      f"s3://{bucket}/{key} at {self.where}; check the key and the prefix")
        return found

    def read(self, f: RemoteFile, start: int, end: int) -> Iterator[bytes]:
        bucket, key = parse_s3_url(f.url)
        if start >= end:
            return
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if f.etag:
            args["IfMatch"] = f.etag
        try:
            resp = self.client.get_object(**args)
        except Exception as exc:  # noqa: BLE001
            self._raise_final(exc, bucket, key)
            raise
        body = resp["Body"]
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    def _file(self, bucket: str, key: str, rel: str, size: int, etag: str | None, version: str | None) -> RemoteFile:
        etag = etag or ""
        bare = etag.strip('"')
        md5 = bare.lower() if len(bare) == 32 and all(c in "0123456789abcdefABCDEF" for c in bare) else None
        return RemoteFile(url=f"s3://{bucket}/{key}", rel=rel, size=int(size),
                          cache_key=f"{self.where}|s3://{bucket}/{key}|{etag}|{version or ''}|{size}",
                          etag=etag or None, md5=md5)

    def _head(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=bucket, Key=key))
        except Exception as exc:  # noqa: BLE001
            if _status(exc) == 404:
                self._check_bucket(bucket)
                return None
            self._raise_final(exc, bucket, key)
            raise

    def _check_bucket(self, bucket: str) -> None:
        try:
            self.client.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001
            if _status(exc) == 404:
                raise SourceNotFoundError(f"bucket '{bucket}' does not exist at {self.where}; check the "
                                          "bucket name and AWS_ENDPOINT_URL") from None
            self._raise_final(exc, bucket, "")
            raise

    def _list(self, bucket: str, prefix: str) -> list[RemoteFile]:
        out: list[RemoteFile] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/"):
                        continue  # a "folder" marker
                    out.append(self._file(bucket, obj["Key"], obj["Key"][len(prefix):], obj["Size"],
                                          obj.get("ETag"), None))
                if len(out) > MAX_OBJECTS:
                    raise BadSourceError(f"s3://{bucket}/{prefix} holds more than {MAX_OBJECTS} objects; "
                                         "point the source at one model's directory")
        except FetchError:
            raise
        except Exception as exc:  # noqa: BLE001
            if _status(exc) == 404 or _code(exc) == "NoSuchBucket":
                raise SourceNotFoundError(f"bucket '{bucket}' does not exist at {self.where}; check the "
                                          "bucket name and AWS_ENDPOINT_URL") from None
            self._raise_final(exc, bucket, prefix)
            raise
        return out

    def _raise_final(self, exc: Exception, bucket: str, key: str) -> None:
        """Turn errors no retry can fix into FetchErrors; others propagate (and are retried)."""
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError

        where = f"s3://{bucket}/{key} at {self.where}"
        if isinstance(exc, EndpointConnectionError):
            raise FetchError(f"cannot reach the S3 endpoint for {where}: {exc}; set AWS_ENDPOINT_URL "
                             "to a reachable S3-compatible endpoint") from None
        if isinstance(exc, NoCredentialsError):
            raise AccessDeniedError(f"no AWS credentials for {where}; set AWS_ACCESS_KEY_ID and "
                                    "AWS_SECRET_ACCESS_KEY (or a profile)") from None
        status, code = _status(exc), _code(exc)
        if code == "NoSuchBucket":
            raise SourceNotFoundError(f"bucket '{bucket}' does not exist at {self.where}") from None
        if status == 404 or code == "NoSuchKey":
            raise SourceNotFoundError(f"no object {where}") from None
        if status in (401, 403):
            raise AccessDeniedError(f"access denied to {where} ({code}); check the credentials and the "
                                    "bucket policy") from None
        if status == 412:
            raise FetchError(f"{where} changed while it was being fetched (ETag no longer matches); "
                             "fetch again") from None
        if status == 416:
            raise FetchError(f"{where}: the store refused a byte range ({code})") from None


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    return None


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""
