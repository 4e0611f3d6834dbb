"""Blobs in an S3-compatible object store (the fleet store: AWS, MinIO, SeaweedFS, Ceph) through boto3.

S3 makes every PUT atomic (an object is all there or not at all, multipart uploads included), so the
store only maps keys and errors. Appliances can PUT frames straight to the store with presigned URLs,
which keeps large uploads off the trainer's API. The bucket is checked (and created if missing) when
the store opens, so wrong credentials or an unreachable endpoint fail at start-up, not on the first frame.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ...errors import ConfigError
from ..config import S3Config
from .base import BlobStore
from .keys import check_key

#: Files above this size go up in parts (boto3's managed transfer); a few threads, not a core each.
_TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
#: Connections kept to the store: as many as the API has worker threads, plus the workers' own.
POOL_CONNECTIONS = 48
_MISSING = {"404", "NoSuchKey", "NotFound"}
_REFUSED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3BlobStore(BlobStore):
    """Blobs as objects of one bucket, keyed as given.

    Raises (when opening):
        ConfigError: the endpoint cannot be reached, refuses the credentials, or the bucket cannot be made.

    """

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.bucket = config.bucket
        self.where = f"s3 bucket {config.bucket!r} at {config.endpoint}"
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=config.endpoint, region_name=config.region, aws_access_key_id=config.access_key,
            aws_secret_access_key=config.secret(),
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=10,
                          read_timeout=120, retries={"max_attempts": 3, "mode": "standard"},
                          # the API's handlers run on up to 40 threads (anyio's pool): one connection each
                          max_pool_connections=POOL_CONNECTIONS))
        try:
            self._open_bucket()
        except BaseException:
            self.client.close()
            raise

    def _open_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) in _REFUSED:
                raise ConfigError(f"{self.where}: access refused for access key {self.config.access_key!r} "
                                  f"({_code(exc)}): check storage.s3.access_key and its secret key") from None
            if _code(exc) not in _MISSING:
                raise ConfigError(f"{self.where}: cannot open the bucket: {exc}") from None
        except BotoCoreError as exc:
            raise ConfigError(f"{self.where}: cannot reach the store: {exc}") from None
        params: dict[str, Any] = {"Bucket": self.bucket}
        if self.config.region != "us-east-1":  # AWS refuses the default region as a location constraint
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            self.client.create_bucket(**params)
        except ClientError as exc:
            if _code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another trainer process made it a moment ago
            hint = ": check the access key and its secret key" if _code(exc) in _REFUSED else ""
            raise ConfigError(f"{self.where}: the bucket is missing and cannot be created: {exc}{hint}") from None

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()

    def __repr__(self) -> str:
        return f"S3BlobStore({self.where!r})"

    def put(self, key: str, data: bytes | Path) -> None:
        """Store bytes (one PUT) or a file (in parts when large); S3 makes either atomic."""
        check_key(key)
        if isinstance(data, (bytes, bytearray, memoryview)):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))
        else:
            self.client.upload_file(str(data), self.bucket, key, Config=_TRANSFER)

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` if there is none."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise KeyError(key) from None
            raise
        with contextlib.closing(response["Body"]) as body:
            return body.read()

    def exists(self, key: str) -> bool:
        """Whether the object exists (a HEAD request)."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    def download(self, key: str, target: Path) -> Path:
        """Fetch the object into ``target`` (via a temporary file beside it, renamed when complete)."""
        check_key(key)
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, key, tmp, Config=_TRANSFER)
            os.replace(tmp, target)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise KeyError(key) from None
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return target

    def delete(self, key: str) -> None:
        """Remove the object (S3 does not mind if it is absent)."""
        self.client.delete_object(Bucket=self.bucket, Key=check_key(key))

    def presign_put(self, key: str, expires_s: int = 900) -> str | None:
        """A URL to PUT the object's bytes to for ``expires_s`` seconds (``None`` when presigning is off)."""
        return self._presign("put_object", key, expires_s)

    def presign_get(self, key: str, expires_s: int = 900) -> str | None:
        """A URL to GET the object from for ``expires_s`` seconds (``None`` when presigning is off)."""
        return self._presign("get_object", key, expires_s)

    def _presign(self, method: str, key: str, expires_s: int) -> str | None:
        if not self.config.presign:
            return None
        return self.client.generate_presigned_url(method, Params={"Bucket": self.bucket, "Key": check_key(key)},
                                                  ExpiresIn=int(expires_s))
