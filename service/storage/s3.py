"""Artifacts in an S3-compatible bucket (AWS, MinIO, moto), and what S3's errors mean.

boto3 and botocore are imported inside the functions that use them, never at module level:
the API imports this package at startup, and loading them there costs it a noticeable
fraction of a second even when storage is local.

Errors are sorted in two: the storage being unavailable (5xx, throttling, connection errors,
bodies that break off), retried and then raised as StorageUnavailable; and everything else
(a missing object, a refused permission), which keeps its meaning and is never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from loftq.storage import sha256_file
from service.settings import Settings
from service.storage.base import COPY_CHUNK, StorageUnavailable, StoredObject, safe_key, safe_prefix

MULTIPART_THRESHOLD = 64 * 2**20
"""Files above this size are uploaded (and downloaded) in parts by the transfer manager."""


def s3_error_code(exc: BaseException) -> str:
    """The S3 error code an exception carries ("NoSuchKey", "AccessDenied", "404"), or "" for
    one that carries none: botocore's ClientError keeps it in its parsed ``response``."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_missing(exc: Exception) -> bool:
    return s3_error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


# Error codes that mean "try again later" whatever their HTTP status (botocore's standard
# retry mode retries them too).
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)


def _unavailable_reason(exc: BaseException | None, max_attempts: int) -> tuple[str, int | None] | None:
    """(what went wrong, attempts made when known) if ``exc`` means the storage is unavailable
    rather than that the request is wrong; None otherwise (a missing object, a refused
    permission and local disk errors keep their own meaning)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as EndpointError
    from urllib3.exceptions import ProtocolError, ReadTimeoutError

    if exc is None:
        return None
    if isinstance(exc, S3UploadFailedError):  # boto3 wraps the ClientError of a failed upload
        return _unavailable_reason(exc.__cause__ or exc.__context__, max_attempts)
    if isinstance(exc, RetriesExceededError):  # a download whose body kept breaking, once per attempt
        last = exc.last_exception
        inner = _unavailable_reason(last, max_attempts)
        return (inner[0] if inner else f"{type(last).__name__}: {last}", max_attempts)
    if isinstance(exc, ClientError):
        response = exc.response or {}
        error = response.get("Error", {})
        meta = response.get("ResponseMetadata", {})
        code, status = s3_error_code(exc), meta.get("HTTPStatusCode")
        if code not in _TRANSIENT_CODES and not (isinstance(status, int) and (status >= 500 or status in (408, 429))):
            return None
        retries = meta.get("RetryAttempts")
        reason = f"{code or 'error'} (HTTP {status}) from {exc.operation_name}: {error.get('Message', '')}".rstrip(": ")
        return reason, None if retries is None else int(retries) + 1
    # urllib3's own errors reach callers that stream a body themselves (open_read)
    broken = (HTTPClientError, EndpointError, IncompleteReadError, ProtocolError, ReadTimeoutError, ConnectionError, TimeoutError)
    if isinstance(exc, broken):
        return f"{type(exc).__name__}: {exc}", getattr(exc, "attempts", None)
    return None


def _note_attempts(attempts: int, caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore's needs-retry hook: mark a connection error with the attempts made so far, so
    the last one, raised when retries are spent, says how many there were (a ClientError
    carries that in its response already). Returns None: the retry decision is botocore's."""
    if caught_exception is not None:
        try:
            caught_exception.attempts = attempts  # type: ignore[attr-defined]
        except AttributeError:
            pass


def storage_unavailable(exc: BaseException, what: str, max_attempts: int) -> StorageUnavailable | None:
    """The StorageUnavailable that ``exc`` amounts to (retries are spent by the time it reaches
    here), or None when ``exc`` is not about the storage being unavailable. ``what`` names the
    operation and object, e.g. "upload of s3://bucket/key"."""
    found = _unavailable_reason(exc, max_attempts)
    if found is None:
        return None
    reason, attempts = found
    tries = f"{attempts} attempt{'s' if attempts != 1 else ''}" if attempts else f"up to {max_attempts} attempts"
    return StorageUnavailable(f"object storage unavailable: {what} failed after {tries} ({reason})")


def _backoff(attempt: int, base: float = 0.05, cap: float = 20.0) -> float:
    """Full-jitter exponential backoff, as botocore's standard mode waits between attempts."""
    return random.random() * min(cap, base * 2 ** (attempt - 1))


class S3ObjectStore:
    """An S3-compatible bucket. Uploads and downloads go through boto3's transfer manager,
    multipart above ``multipart_threshold``; every upload carries its sha256 in the object's
    metadata ("sha256"), so checking a file never needs to read it back.

    Every request is retried (``max_attempts`` in all, botocore's ``retry_mode``) on 5xx,
    throttling and connection errors; a download whose body breaks off is fetched again as
    often. What still fails is raised as StorageUnavailable; other errors (a missing object,
    a refused permission) are not retried and keep their meaning."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        retry_mode: str = "standard",
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.region = region
        self.max_attempts = max_attempts
        if client is None:
            config = Config(
                signature_version="s3v4",
                retries={"total_max_attempts": max_attempts, "mode": retry_mode},
                # MinIO, moto and other endpoints given by address serve buckets by path.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.client = client
        events = getattr(getattr(client, "meta", None), "events", None)
        if events is not None:
            events.register("needs-retry.s3", _note_attempts, unique_id="loftq-note-attempts")
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, 5 * 2**20),  # S3's smallest part is 5 MiB
            max_concurrency=max_concurrency,
            num_download_attempts=max_attempts,  # a body that breaks off after a 200 is not botocore's to retry
        )

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    @contextlib.contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        """Raise StorageUnavailable, naming ``what``, for errors that retrying could not cure."""
        try:
            yield
        except StorageUnavailable:
            raise
        except Exception as exc:
            error = storage_unavailable(exc, what, self.max_attempts)
            if error is None:
                raise
            raise error from exc

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._unavailable(f"check of bucket s3://{self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_missing(exc):
                    raise
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self.client.create_bucket(**kwargs)
            except ClientError as exc:
                if s3_error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def upload_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        safe_key(key)
        digest = sha256 or sha256_file(path)
        with self._unavailable(f"upload of {self._uri(key)}"):
            self.client.upload_file(
                str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}}, Config=self.transfer_config
            )

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        safe_key(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._unavailable(f"download of {self._uri(key)}"):
            try:
                self.client.download_file(self.bucket, key, str(path), Config=self.transfer_config)
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
                raise

    def read_bytes(self, key: str) -> bytes | None:
        """The whole object, or None if there is none. A body that breaks off is read again
        (botocore retries a request only until its response headers arrive)."""
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError

        safe_key(key)
        with self._unavailable(f"read of {self._uri(key)}"):
            for attempt in range(1, self.max_attempts + 1):
                try:
                    response = self.client.get_object(Bucket=self.bucket, Key=key)
                except ClientError as exc:
                    if _is_missing(exc):
                        return None
                    raise
                body = response["Body"]  # read through it, not its raw stream: it reports a short body
                try:
                    return body.read()
                except (HTTPClientError, IncompleteReadError, ConnectionError, TimeoutError):
                    if attempt == self.max_attempts:
                        raise
                    time.sleep(_backoff(attempt))
                finally:
                    body.close()
        raise AssertionError("unreachable")

    def sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError

        safe_key(key)
        with self._unavailable(f"check of {self._uri(key)}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
            recorded = head.get("Metadata", {}).get("sha256")
            if recorded:
                return recorded
            # Written by someone else: hash it as a stream (never whole in memory).
            digest = hashlib.sha256()
            with self.open_read(key) as body:
                while chunk := body.read(COPY_CHUNK):
                    digest.update(chunk)
            return digest.hexdigest()

    def list(self, prefix: str) -> list[StoredObject]:
        prefix = safe_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        with self._unavailable(f"listing of {self._uri(prefix)}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found.append(StoredObject(item["Key"], int(item["Size"])))
        return sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        safe_key(key)
        with self._unavailable(f"delete of {self._uri(key)}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def delete_prefix(self, prefix: str) -> None:
        prefix = safe_prefix(prefix, allow_empty=False)
        keys = [obj.key for obj in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._unavailable(f"delete of {len(batch)} objects under {self._uri(prefix)}"):
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(f"could not delete {len(errors)} objects, e.g. {first.get('Key')!r}: {first.get('Message')}")

    def presigned_url(self, key: str, expires_in: int) -> str | None:
        safe_key(key)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_in)
        )

    def presigned_put_url(self, key: str, expires_in: int) -> str | None:
        """A URL that lets its holder, and nobody else, write this one object for a while."""
        safe_key(key)
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expires_in)
        )

    # -- multipart uploads by clients: the API starts and finishes them, clients PUT the parts

    def start_multipart(self, key: str) -> str:
        safe_key(key)
        with self._unavailable(f"start of a multipart upload to {self._uri(key)}"):
            return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def presigned_part_url(self, key: str, upload_id: str, number: int, expires_in: int) -> str:
        safe_key(key)
        params = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": number}
        return self.client.generate_presigned_url("upload_part", Params=params, ExpiresIn=int(expires_in))

    def uploaded_parts(self, key: str, upload_id: str) -> list[tuple[int, int, str]] | None:
        """(number, size, ETag) of each part received so far; None once the upload is no more
        (finished or aborted)."""
        from botocore.exceptions import ClientError

        safe_key(key)
        parts: list[tuple[int, int, str]] = []
        with self._unavailable(f"listing of the parts of {self._uri(key)}"):
            try:
                for page in self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                    parts += [(int(p["PartNumber"]), int(p["Size"]), p["ETag"]) for p in page.get("Parts", [])]
            except ClientError as exc:
                if s3_error_code(exc) in ("NoSuchUpload", "404"):
                    return None
                raise
        return sorted(parts)

    def finish_multipart(self, key: str, upload_id: str, parts: list[tuple[int, int, str]]) -> None:
        """Join the parts into the object; one finished already (by a concurrent call) is left as it is."""
        from botocore.exceptions import ClientError

        safe_key(key)
        listed = [{"PartNumber": number, "ETag": etag} for number, _, etag in parts]
        with self._unavailable(f"completion of the multipart upload to {self._uri(key)}"):
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed}
                )
            except ClientError as exc:
                if s3_error_code(exc) not in ("NoSuchUpload", "404"):
                    raise

    def abort_multipart(self, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        safe_key(key)
        with self._unavailable(f"abort of the multipart upload to {self._uri(key)}"):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if s3_error_code(exc) not in ("NoSuchUpload", "404"):
                    raise

    def open_read(self, key: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        safe_key(key)
        with self._unavailable(f"read of {self._uri(key)}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(f"no object {key!r} in bucket {self.bucket!r}") from exc
                raise

    def ping(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:
            return False
        return True


def s3_store(settings: Settings, bucket: str | None = None) -> S3ObjectStore:
    """A bucket (the artifact bucket unless named) on the configured endpoint, with the
    configured retries: sources and calibration text are read with the same policy as
    artifacts are written."""
    return S3ObjectStore(
        bucket or settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        max_attempts=settings.s3_max_attempts,
        retry_mode=settings.s3_retry_mode,
    )
