"""A small synchronous client for the LoftQ jobs API.

Standalone on purpose: it speaks JSON over ``httpx`` and returns the pydantic models of
``loftq_client.models``; it never imports torch, the conversion engine or the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from loftq_client.models import (
    Artifact,
    ArtifactList,
    Event,
    EventPage,
    Job,
    JobPage,
    Upload,
    UploadTarget,
    WebhookDelivery,
    WebhookDeliveryList,
)

USER_AGENT = "loftq-client/0.1"
_CHUNK = 1 << 20


class LoftQClientError(Exception):
    """Base class of the errors this package raises."""


class ApiError(LoftQClientError):
    """A non-2xx answer from the API: HTTP ``status``, machine-readable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Parse ``{"error": {"code", "message"}}``; also FastAPI's ``{"detail": ...}``; else the text."""
        status = response.status_code
        fallback_code = "validation_error" if status == 422 else f"http_{status}"
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            if isinstance(error, dict) and ("code" in error or "message" in error):
                return cls(status, str(error.get("code") or fallback_code), str(error.get("message") or ""))
            if isinstance(error, str):
                return cls(status, fallback_code, error)
            detail = body.get("detail")
            if isinstance(detail, str):
                return cls(status, fallback_code, detail)
            if isinstance(detail, list):
                parts = []
                for item in detail:
                    if isinstance(item, dict):
                        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
                        parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
                    else:
                        parts.append(str(item))
                return cls(status, fallback_code, "; ".join(parts))
        try:
            text = response.text.strip()
        except Exception:  # undecodable body
            text = ""
        return cls(status, fallback_code, text[:1000] or response.reason_phrase or f"HTTP {status}")


class ChecksumMismatch(LoftQClientError):
    """A downloaded artifact does not have the size or sha256 the API announced (nothing was kept)."""

    def __init__(self, path: str, *, expected_sha256: str, actual_sha256: str | None, expected_size: int, actual_size: int) -> None:
        what = (
            f"size {actual_size} != {expected_size}"
            if actual_size != expected_size
            else f"sha256 {actual_sha256} != {expected_sha256}"
        )
        super().__init__(f"{path}: {what}")
        self.path = path
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        self.expected_size = expected_size
        self.actual_size = actual_size


class UnsafeArtifactPath(LoftQClientError, ValueError):
    """An artifact path that would escape the download directory (absolute or with ``..``)."""


class _BearerAuth(httpx.Auth):
    """Adds the API key only to requests for the API's own origin (never to presigned S3 URLs)."""

    def __init__(self, api_key: str, base_url: httpx.URL) -> None:
        self._header = f"Bearer {api_key}"
        self._origin = _origin(base_url)

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        if _origin(request.url) == self._origin:
            request.headers["Authorization"] = self._header
        yield request


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default


def _q(job_id: str) -> str:
    return quote(str(job_id), safe="")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Engine options without ``None`` values, one level down too (``calibration={...}``);
    a dict option left empty is dropped."""
    cleaned: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None} or None
        if value is not None:
            cleaned[key] = value
    return cleaned


class LoftQClient:
    """Client of the jobs API (``/v1``). Use as a context manager, or call :meth:`close`.

    Every non-2xx answer raises :class:`ApiError`; network failures raise ``httpx.TransportError``.
    ``api_key`` (default: env ``LOFTQ_API_KEY``; "" for none) is sent as ``Authorization: Bearer``
    to the API's own origin only, never to presigned storage URLs.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        if api_key is None:
            api_key = os.environ.get("LOFTQ_API_KEY")
        base = httpx.URL(self.base_url)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            auth=_BearerAuth(api_key, base) if api_key else None,
            timeout=timeout,
            transport=transport,
        )

    # -- plumbing -------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LoftQClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoftQClient({self.base_url!r})"

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if not response.is_success:
            raise ApiError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code, "invalid_response", f"expected JSON from {method} {path}") from None

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        source: str,
        *,
        output: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        calibration_data: str | None = None,
        distributed: bool = False,
        shards_per_part: int | None = None,
        webhook_url: str | None = None,
        webhook_events: Iterable[str] | None = None,
        **options: Any,
    ) -> Job:
        """Submit a conversion. ``options`` are engine options (quant, bits, rank, lora_alpha, iters,
        svd, target_modules, backbone_format, objective, calibration={samples, seq_len, eval_samples,
        seed, batch_size, propagation, evaluate}, refine="none"|"block"|"model"|"block+model",
        refinement={steps, lr, batch_size, holdout, model_steps, model_lr, model_batch_size}, ...);
        ``None`` values, also inside a dict option, are left out so server defaults apply.
        ``calibration_data`` is a URI of calibration text (``s3://bucket/key.txt``,
        ``s3://bucket/prefix/`` or ``file:///path``), needed when ``objective`` is not "weight",
        ``refine`` is not "none" or ``calibration["evaluate"]`` is true. ``distributed`` spreads
        the weight shards over several workers (``shards_per_part`` to a task) and merges them;
        the artifacts are the same; not for calibrated jobs (422).

        ``webhook_url`` (http:// or https://) is sent the job's events, signed as Standard Webhooks
        specifies; ``webhook_events`` picks them among ``WEBHOOK_EVENTS`` (default: every change of
        state, not job.progress). The signing secret is ``webhook_secret`` of the returned Job, and
        of this answer only: keep it to verify the ``webhook-signature`` header. An address the
        operator does not allow (private, loopback) is ``ApiError`` 422 ``webhook_not_allowed``."""
        body: dict[str, Any] = {
            "source": source,
            "output": output,
            "options": _options(options),
            "metadata": dict(metadata or {}),
        }
        if calibration_data is not None:
            body["calibration_data"] = calibration_data
        if distributed:
            body["distributed"] = True
        if shards_per_part is not None:
            body["shards_per_part"] = shards_per_part
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        if webhook_events is not None:
            body["webhook_events_filter"] = [webhook_events] if isinstance(webhook_events, str) else list(webhook_events)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.model_validate(self._json("POST", "/v1/jobs", json=body, headers=headers))

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._json("GET", f"/v1/jobs/{_q(job_id)}"))

    def list_jobs(self, *, limit: int = 20, state: str | None = None, after: str | None = None) -> JobPage:
        params = _params(limit=limit, state=state, after=after)
        return JobPage.model_validate(self._json("GET", "/v1/jobs", params=params))

    def iter_jobs(self, state: str | None = None, *, page_size: int = 100) -> Iterator[Job]:
        """Every job (newest first, as the server orders them), following ``next_after``."""
        after: str | None = None
        while True:
            page = self.list_jobs(limit=page_size, state=state, after=after)
            yield from page.jobs
            if not page.has_more or not page.jobs:
                return
            cursor = page.next_after or page.jobs[-1].id
            if cursor == after:  # a server that does not move forward: stop rather than loop
                return
            after = cursor

    def cancel_job(self, job_id: str) -> Job:
        return Job.model_validate(self._json("POST", f"/v1/jobs/{_q(job_id)}/cancel"))

    def delete_job(self, job_id: str) -> Job | None:
        """Remove a job: its artifacts, record and events. ``None`` when it was removed at once (a
        queued or finished job, HTTP 204); the cancelling Job when it was running (HTTP 202): it is
        removed once its worker has stopped (see :meth:`wait_deleted`). A job that is unknown or
        already deleted is ``ApiError`` 404 ``job_not_found``."""
        path = f"/v1/jobs/{_q(job_id)}"
        response = self._request("DELETE", path)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return Job.model_validate(response.json())
        except ValueError:
            raise ApiError(response.status_code, "invalid_response", f"expected a job from DELETE {path}") from None

    def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """Every webhook delivery of the job (to its own webhook_url and its tenant's), oldest
        first: state (pending, delivered, failed), attempts, the last HTTP status or error."""
        data = self._json("GET", f"/v1/jobs/{_q(job_id)}/webhooks")
        return WebhookDeliveryList.model_validate(data).deliveries

    # -- events ---------------------------------------------------------------------------------

    def events(self, job_id: str, after: str | None = None) -> EventPage:
        params = _params(after=after)
        return EventPage.model_validate(self._json("GET", f"/v1/jobs/{_q(job_id)}/events", params=params))

    def iter_events(self, job_id: str, after: str | None = None) -> Iterator[Event]:
        """All events stored so far (pages through :meth:`events`); does not wait for new ones."""
        while True:
            page = self.events(job_id, after=after)
            yield from page.events
            if not page.events:
                return
            cursor = page.next_after or page.events[-1].id
            if cursor == after:
                return
            after = cursor

    def stream_events(self, job_id: str, after: str | None = None, *, read_timeout: float | None = None) -> Iterator[Event]:
        """Live events over Server-Sent Events; the iterator ends when the server ends the stream
        (the job finished). ``read_timeout`` bounds the silence between two chunks (default: none)."""
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        with self._http.stream(
            "GET",
            f"/v1/jobs/{_q(job_id)}/events/stream",
            params=_params(after=after),
            headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
            timeout=timeout,
        ) as response:
            if not response.is_success:
                response.read()
                raise ApiError.from_response(response)
            yield from parse_sse(response.iter_lines())

    # -- waiting --------------------------------------------------------------------------------

    def wait(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        progress: bool = True,
        max_errors: int = 5,
    ) -> Job:
        """Poll until the job is succeeded, failed or cancelled and return it (a failed job is returned,
        not raised). Shows a rich progress bar of layers on stderr when ``progress``. Raises
        ``TimeoutError`` after ``timeout`` seconds. Up to ``max_errors`` consecutive transient failures
        (network errors, 429, 5xx) are retried."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = task = None
        if progress:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("layers"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            bar.start()
            task = bar.add_task(f"{job_id} …", total=None)
        errors = 0
        try:
            while True:
                try:
                    job = self.get_job(job_id)
                    errors = 0
                except (httpx.TransportError, ApiError) as exc:
                    errors += 1
                    if not _transient(exc) or errors > max_errors:
                        raise
                    job = None
                if job is not None:
                    if bar is not None:
                        bar.update(task, description=progress_description(job), completed=job.progress.layers_done,
                                   total=job.progress.layers_total or None)
                    if job.finished:
                        return job
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    state = job.state if job is not None else "unknown"
                    raise TimeoutError(f"job {job_id} still {state} after {timeout:g} s")
                time.sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - now)))
        finally:
            if bar is not None:
                bar.stop()

    def wait_deleted(
        self,
        job_id: str,
        *,
        poll_interval: float = 1.0,
        timeout: float | None = None,
        max_errors: int = 5,
    ) -> None:
        """Poll until the job is gone (``GET`` answers 404 ``job_not_found``): after
        :meth:`delete_job` returned a cancelling job, that is once its worker has stopped and the
        job was removed. Raises ``TimeoutError`` after ``timeout`` seconds. Up to ``max_errors``
        consecutive transient failures (network errors, 429, 5xx) are retried."""
        deadline = None if timeout is None else time.monotonic() + timeout
        errors = 0
        state = "unknown"
        while True:
            try:
                state = self.get_job(job_id).state
                errors = 0
            except ApiError as exc:
                if exc.status == 404 and exc.code == "job_not_found":
                    return
                errors += 1
                if not _transient(exc) or errors > max_errors:
                    raise
            except httpx.TransportError:
                errors += 1
                if errors > max_errors:
                    raise
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(
                    f"job {job_id} is not deleted after {timeout:g} s: still {state} "
                    "(it is removed once its worker has stopped)"
                )
            time.sleep(poll_interval if deadline is None else max(0.0, min(poll_interval, deadline - now)))

    # -- uploads --------------------------------------------------------------------------------

    def upload_model(self, directory: str | os.PathLike[str], *, on_file: Any = None) -> Upload:
        """Upload every file of a model directory (hidden ones skipped) into the tenant's own
        area and complete the upload; returns it, with ``source`` (``upload://<id>``) to give to
        :meth:`create_job`. Files go straight to storage on presigned URLs where the server has
        them (large files in parts), else to the API. ``on_file(path, size)`` is called as
        each file is sent."""
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        files = sorted(
            (path.relative_to(root).as_posix(), path)
            for path in root.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
        if not files:
            raise FileNotFoundError(f"{root} holds no files to upload")
        declared = {name: path.stat().st_size for name, path in files}
        upload = Upload.model_validate(self._json("POST", "/v1/uploads", json={"files": declared}))
        local = dict(files)
        for target in upload.files:
            if on_file is not None:
                on_file(target.path, target.size)
            self._send_file(local[target.path], target)
        return Upload.model_validate(self._json("POST", f"/v1/uploads/{_q(upload.id)}/complete"))

    def get_upload(self, upload_id: str) -> Upload:
        return Upload.model_validate(self._json("GET", f"/v1/uploads/{_q(upload_id)}"))

    def delete_upload(self, upload_id: str) -> None:
        self._request("DELETE", f"/v1/uploads/{_q(upload_id)}")

    def _send_file(self, path: Path, target: UploadTarget) -> None:
        """PUT the file, or each of its parts from its offset, to the target's URLs, streamed
        with its Content-Length (S3 takes no chunked uploads); never whole in memory."""
        pieces, offset = [], 0
        for part in target.parts or []:
            pieces.append((part.url, offset, part.size))
            offset += part.size
        if target.url:
            pieces = [(target.url, 0, target.size)]
        with open(path, "rb") as fh:
            for url, offset, size in pieces:

                def body(offset: int = offset, size: int = size) -> Iterator[bytes]:
                    fh.seek(offset)
                    left = size
                    while left:
                        chunk = fh.read(min(_CHUNK, left))
                        if not chunk:
                            raise LoftQClientError(f"{path} is shorter than its declared {target.size} bytes (changed while uploading?)")
                        left -= len(chunk)
                        yield chunk

                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
                response = self._http.put(url, content=body(), headers=headers)
                if not response.is_success:
                    raise ApiError.from_response(response)

    # -- artifacts ------------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> list[Artifact]:
        """Files of a succeeded job (``ApiError`` 409 ``job_not_finished`` before that)."""
        return ArtifactList.model_validate(self._json("GET", f"/v1/jobs/{_q(job_id)}/artifacts")).artifacts

    def download(self, job_id: str, dest_dir: str | os.PathLike[str]) -> list[Path]:
        """Download every artifact under ``dest_dir`` (keeping sub-directories) and return the paths.

        Each file is streamed to ``<name>.partial``, checked against the announced size and sha256
        and only then renamed into place; on a mismatch the partial file is removed and
        :class:`ChecksumMismatch` is raised. Files already present with the right checksum are kept.
        """
        dest = Path(dest_dir)
        paths = []
        for artifact in self.artifacts(job_id):
            target = dest.joinpath(*_safe_parts(artifact.path))
            if not (target.is_file() and target.stat().st_size == artifact.size and _sha256_file(target) == artifact.sha256.lower()):
                self._download_one(job_id, artifact, target)
            paths.append(target)
        return paths

    def _download_one(self, job_id: str, artifact: Artifact, target: Path) -> None:
        url = artifact.url or f"/v1/jobs/{_q(job_id)}/artifacts/files/{quote(artifact.path, safe='/')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        size = 0
        try:
            with self._http.stream("GET", url, headers={"Accept": "*/*"}, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    raise ApiError.from_response(response)
                with open(partial, "wb") as fh:
                    for chunk in response.iter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > artifact.size:
                            break
                        digest.update(chunk)
                        fh.write(chunk)
            actual = digest.hexdigest() if size == artifact.size else None
            if size != artifact.size or actual != artifact.sha256.lower():
                raise ChecksumMismatch(
                    artifact.path,
                    expected_sha256=artifact.sha256,
                    actual_sha256=actual,
                    expected_size=artifact.size,
                    actual_size=size,
                )
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def _transient(exc: Exception) -> bool:
    """Worth polling again: a network failure, 429 or a 5xx."""
    return isinstance(exc, httpx.TransportError) or (isinstance(exc, ApiError) and (exc.status == 429 or exc.status >= 500))


def progress_description(job: Job) -> str:
    """``<id> <state> [<stage>]``, with the block count while a calibrated job is calibrating."""
    p = job.progress
    stage = f"{p.stage} block {p.blocks_done}/{p.blocks_total}" if p.stage == "calibrating" and p.blocks_total else p.stage
    return f"{job.id} {job.state} [{stage}]"


def _safe_parts(path: str) -> tuple[str, ...]:
    pure = PurePosixPath(path.replace("\\", "/"))
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if pure.is_absolute() or not parts or any(p == ".." or ":" in p for p in parts):
        raise UnsafeArtifactPath(f"refusing artifact path {path!r}")
    return parts


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- Server-Sent Events ---------------------------------------------------------------------------


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Turn ``text/event-stream`` lines into :class:`Event` objects.

    Comment lines (``:`` heartbeats), blocks without ``data`` and ``ping``/``heartbeat`` events are
    skipped; several ``data:`` lines of one block are joined with newlines. The data is the event as JSON
    (``{"id", "type", "time", "data"}``) or just its payload, completed from ``id:`` / ``event:``.
    """
    last_id: str | None = None
    event_type: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if _dispatchable(event_type, data):
                yield _sse_event(last_id, event_type, "\n".join(data))
            event_type, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event_type = value
        elif field == "id" and "\0" not in value:
            last_id = value
        # "retry" and unknown fields are ignored
    if _dispatchable(event_type, data):  # stream ended without the final blank line: still deliver it
        yield _sse_event(last_id, event_type, "\n".join(data))


_HEARTBEATS = frozenset({"ping", "heartbeat", "keepalive", "keep-alive"})


def _dispatchable(event_type: str | None, data: list[str]) -> bool:
    """Blocks without data, with only blank data, or typed as heartbeats carry no job event."""
    return bool("".join(data).strip()) and (event_type or "").lower() not in _HEARTBEATS


def _sse_event(sse_id: str | None, sse_type: str | None, text: str) -> Event:
    try:
        payload: Any = json.loads(text)
    except ValueError:
        payload = {"text": text}
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict) and ("type" in payload or "time" in payload):
        fields = dict(payload)
    else:
        fields = {"data": payload if isinstance(payload, dict) else {"value": payload}}
        if isinstance(payload, dict) and "time" in payload:
            fields["time"] = payload["time"]
    fields.setdefault("id", sse_id or "")
    fields.setdefault("type", sse_type or "message")
    fields.setdefault("time", datetime.now(timezone.utc))
    try:
        return Event.model_validate(fields)
    except ValidationError:
        return Event(id=str(fields["id"]), type=str(fields["type"]), time=datetime.now(timezone.utc), data={"value": payload})
