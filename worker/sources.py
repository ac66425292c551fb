"""Adapters between the engine's Source/Destination protocols (loftq.storage) and the
service's storage: S3 buckets and the Hugging Face Hub as sources, an ObjectStore as the
destination.

A source hands the engine one file at a time: ``open_local`` downloads a single object into
the worker's scratch directory and deletes it when the ``with`` block exits, so a model never
sits whole on local disk. The destination stages one output file at a time and uploads it as
soon as the engine says it is complete.

Calibration text (``fetch_calibration_data``) is read whole by the engine, so it is fetched
before the conversion starts: file:// in place, S3 objects into the scratch directory, never
more than ``settings.calibration_max_bytes``.

Every URI is checked again here, before anything is read, by the policy the API applied at
submission (``service.policy.SourcePolicy``): the job's tenant reads only what it may, with its
own Hub token or none, and each local file is checked as it is met.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from loftq.errors import LoftQError, SourceNotFound, UnsafePath
from loftq.storage import MANIFEST_NAME, canonical_relative
from service.errors import CalibrationDataNotFound, CalibrationDataTooLarge, InvalidCalibrationSource, ModelTooLarge
from service.locations import CalibrationLocation, FileLocation, S3Location, SourceLocation, UploadLocation
from service.policy import SourcePolicy, upload_prefix
from service.settings import Settings
from service.storage import (
    ObjectStore,
    S3ObjectStore,
    StorageUnavailable,
    StoredObject,
    UnsafeKey,
    s3_error_code,
    s3_store,
    safe_key,
    sha256_file,
    store_from_settings,
)
from service.text import unsafe_character
from service.uris import CALIBRATION_SUFFIXES, file_root_match

log = logging.getLogger(__name__)



def open_source(uri: str, settings: Settings, scratch: Path, *, tenant: str, location: SourceLocation | None = None) -> Any:
    """The engine Source for ``uri`` as ``tenant`` may read it (service/policy.py, checked again
    here: the job waited in a queue, and the policy may have changed); downloads go to
    ``scratch`` one file at a time. ``location``: ``uri`` as parsed at submission (the job's
    ``inputs``), checked again instead of parsed again.

    A checkpoint above ``settings.max_model_bytes`` (from the listing: nothing is downloaded)
    is refused here, so every path that converts (a job, a part, a merge) checks it."""
    policy = SourcePolicy(settings)
    location = policy.check_source(uri, tenant, location)
    scratch = Path(scratch)
    if isinstance(location, FileLocation):
        source = _confined_local_source()(location.path, lambda real: _check_local_file("source", uri, tenant, real, policy))
    else:
        scratch.mkdir(parents=True, exist_ok=True)
        if isinstance(location, S3Location):
            source = S3Source(location.bucket, location.key, scratch, store=s3_store(settings, location.bucket))
        elif isinstance(location, UploadLocation):
            prefix = "/".join(filter(None, (upload_prefix(tenant, location.upload), location.path)))
            source = S3Source("", prefix, scratch, store=store_from_settings(settings), name=uri.rstrip("/"))
        else:
            source = HubSource(location.repo, location.revision or None, scratch, token=policy.hub_token(tenant))
    size = source.total_bytes()
    if size > settings.max_model_bytes:
        raise ModelTooLarge(
            f"source {uri} holds {size} bytes, above this service's limit of {settings.max_model_bytes} (LOFTQ_MAX_MODEL_BYTES)"
        )
    return source


def _check_local_file(what: str, uri: str, tenant: str, path: Path, policy: SourcePolicy) -> None:
    """A file or directory met while reading a file:// URI: its real path must lie inside the
    allowed roots (UnsafePath) and what the tenant may read (SourceNotAllowed), and a file
    must have no other names. A hard link is a second name for the same bytes that the root
    check cannot see through: one made by anyone with write access to an allowed root from a
    file elsewhere would pass every path check, so linked files are refused outright."""
    real = os.path.realpath(path)
    shown = f"{what}: {uri}: {path.name}"
    if file_root_match(Path(real), list(policy.settings.allowed_file_roots)) is None:
        raise UnsafePath("leads outside the allowed file roots", path=shown)
    policy.check_file(what, uri, tenant, real)
    info = os.stat(real)
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise UnsafePath(f"is a hard link ({info.st_nlink} names for one file); copy the file instead", path=shown)


@functools.cache
def _confined_local_source() -> type:
    """loftq.storage.LocalSource that checks every file and directory it lists or opens with
    ``check`` (``_check_local_file``): a symlink inside the checkpoint directory pointing at
    /etc, at the service's data or at a directory the tenant was not granted is refused, and
    the directories such links lead to are never listed. Built on first use so that importing
    this module does not import torch."""
    from loftq.storage import LocalSource

    class ConfinedLocalSource(LocalSource):
        def __init__(self, root: str, check: Callable[[Path], None]) -> None:
            super().__init__(root)
            self.check = check
            self._files: list[str] | None = None

        def list_files(self) -> list[str]:
            if self._files is None:
                files, seen = [], set()
                for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
                    directory = Path(dirpath)
                    self.check(directory)  # before anything under it is named
                    real = os.path.realpath(directory)
                    if real in seen:  # a symlink loop, or a directory linked twice: listed once
                        dirnames.clear()
                        continue
                    seen.add(real)
                    dirnames.sort()
                    for filename in filenames:
                        self.check(directory / filename)
                        files.append((directory / filename).relative_to(self.root).as_posix())
                self._files = sorted(files)
            return list(self._files)

        @contextlib.contextmanager
        def open_local(self, name: str) -> Iterator[Path]:
            with super().open_local(name) as path:
                self.check(path)  # again: the directory may have changed since it was listed
                yield path

        def total_bytes(self) -> int:
            return sum((self.root / name).stat().st_size for name in self.list_files())

    return ConfinedLocalSource


# --------------------------------------------------------------------------- sources


def _checkpoint_name(name: str) -> str:
    """Refuse object names that would escape the checkpoint (loftq.storage.canonical_relative)
    or that carry format characters (a bidi override would disguise the name in logs)."""
    canonical_relative(name)
    character = unsafe_character(name)
    if character is not None:
        raise UnsafePath(f"file name {name!r} in checkpoint contains {character}")
    return name


@contextlib.contextmanager
def _scratch_file(scratch: Path, name: str) -> Iterator[Path]:
    """A fresh directory under ``scratch`` for one download, removed afterwards."""
    scratch.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=scratch, prefix="dl-"))
    try:
        yield directory / PurePosixPath(name).name
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class S3Source:
    """A checkpoint stored as objects under ``s3://bucket/prefix/``, or under any prefix of an
    ObjectStore (an upload in the artifact store, local or S3)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        scratch: Path,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any = None,
        store: ObjectStore | None = None,
        name: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.scratch = Path(scratch)
        # What messages call it: the URI the tenant gave, never a key it did not name.
        self.name = name or (f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}")
        self.store = store or S3ObjectStore(bucket, endpoint_url=endpoint_url, region=region, client=client)
        self._objects: dict[str, tuple[str, int]] | None = None  # name -> (key, size)

    def _listing(self) -> dict[str, tuple[str, int]]:
        if self._objects is None:
            key_prefix = f"{self.prefix}/" if self.prefix else ""
            try:
                stored = self.store.list(key_prefix)
            except StorageUnavailable as exc:
                raise StorageUnavailable(f"reading the source {self.name}: {exc.message}") from exc
            except Exception as exc:
                code = s3_error_code(exc)
                if code in ("NoSuchBucket", "404", "AccessDenied", "403"):
                    raise SourceNotFound(f"cannot list the bucket ({code})", path=self.name) from exc
                raise
            objects = {}
            for obj in stored:
                if obj.key.endswith("/"):  # "folder" placeholder objects
                    continue
                objects[_checkpoint_name(obj.key[len(key_prefix) :])] = (obj.key, obj.size)
            if not objects:
                raise SourceNotFound("no objects under this prefix", path=self.name)
            self._objects = objects
        return self._objects

    def list_files(self) -> list[str]:
        return sorted(self._listing())

    def total_bytes(self) -> int:
        """Size of the whole checkpoint, from the listing (for a size limit before converting)."""
        return sum(size for _, size in self._listing().values())

    @contextlib.contextmanager
    def open_local(self, name: str) -> Iterator[Path]:
        entry = self._listing().get(name)
        if entry is None:
            raise SourceNotFound("file is missing from the checkpoint", path=f"{self.name}/{name}")
        with _scratch_file(self.scratch, name) as path:
            try:
                self.store.download_file(entry[0], path)
            except FileNotFoundError as exc:
                raise SourceNotFound("file disappeared from the bucket", path=f"{self.name}/{name}") from exc
            except StorageUnavailable as exc:
                raise StorageUnavailable(f"reading the source {self.name}: {exc.message}") from exc
            yield path


@contextlib.contextmanager
def _hub_errors(path: str, doing: str) -> Iterator[None]:
    """The Hub's errors as the job codes they mean: a repository, revision or file that is not
    there (or is private or gated to this tenant's token) is source_not_found; a Hub that
    cannot be reached (offline mode, connection errors, 5xx and 429 after the client's own
    retries) is storage_unavailable, like S3 that stays down."""
    import httpx
    from huggingface_hub import errors

    try:
        yield
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, httpx.TransportError, ConnectionError) as exc:
        raise StorageUnavailable(f"{doing} {path}: the Hugging Face Hub cannot be reached ({type(exc).__name__})") from exc
    except errors.GatedRepoError as exc:
        raise SourceNotFound(
            "the repository is gated: its terms must be accepted with a Hub token, and the operator gives tenants "
            "theirs in LOFTQ_HF_TOKENS",
            path=path,
        ) from exc
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.EntryNotFoundError) as exc:
        raise SourceNotFound(
            f"not found ({type(exc).__name__}); private repositories need a Hub token for your tenant (LOFTQ_HF_TOKENS)",
            path=path,
        ) from exc
    except errors.HFValidationError as exc:
        raise SourceNotFound(f"not a valid repository or revision: {exc}", path=path) from exc
    except errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is not None and (status >= 500 or status == 429):
            raise StorageUnavailable(f"{doing} {path}: the Hugging Face Hub answered {status}") from exc
        raise SourceNotFound(f"the Hub refused the request ({status})", path=path) from exc


class HubSource:
    """A model repository on the Hugging Face Hub; one file downloaded at a time, outside the
    Hub cache (``local_dir`` in a scratch directory), deleted after use."""

    def __init__(self, repo_id: str, revision: str | None, scratch: Path, *, token: str | bool = False) -> None:
        self.repo_id = repo_id
        self.revision = revision or None
        self.scratch = Path(scratch)
        self.token = token  # False: anonymous; None would let huggingface_hub use the worker's own login
        # base_model_name_or_path in the adapter config: what PEFT/transformers load the base by.
        self.name = repo_id
        self.uri = f"hf://{repo_id}@{revision}" if revision else f"hf://{repo_id}"
        self._files: list[str] | None = None

    def list_files(self) -> list[str]:
        if self._files is None:
            import huggingface_hub

            with _hub_errors(self.uri, "listing"):
                files = huggingface_hub.HfApi().list_repo_files(self.repo_id, revision=self.revision, token=self.token)
            names = sorted(_checkpoint_name(f) for f in files)
            if not names:
                raise SourceNotFound("the repository holds no files", path=self.uri)
            self._files = names
        return list(self._files)

    def total_bytes(self) -> int:
        """From the repository's file metadata (sizes of LFS and regular files)."""
        import huggingface_hub

        with _hub_errors(self.uri, "reading the file sizes of"):
            info = huggingface_hub.HfApi().model_info(self.repo_id, revision=self.revision, files_metadata=True, token=self.token)
        return sum(sibling.size or 0 for sibling in info.siblings or [])

    @contextlib.contextmanager
    def open_local(self, name: str) -> Iterator[Path]:
        import huggingface_hub

        if name not in self.list_files():
            raise SourceNotFound("file is missing from the checkpoint", path=f"{self.uri}/{name}")
        self.scratch.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(dir=self.scratch, prefix="hf-"))
        try:
            with _hub_errors(f"{self.uri}/{name}", "downloading"):
                downloaded = huggingface_hub.hf_hub_download(
                    self.repo_id, name, revision=self.revision, local_dir=directory, token=self.token
                )
            yield Path(downloaded)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- calibration text


def fetch_calibration_data(
    uri: str,
    settings: Settings,
    scratch: Path,
    *,
    tenant: str,
    store: ObjectStore | None = None,
    location: CalibrationLocation | None = None,
) -> Path:
    """The local path the engine reads ``uri``'s calibration text from.

    file://: the file, or the .txt/.jsonl files of the directory, copied into ``scratch`` once
    every file and directory met is checked to lie inside what the tenant may read (a symlink
    must not smuggle /etc into the text), each file again as it is opened. s3://:
    one object, or every .txt/.jsonl object under a prefix (relative names kept), downloaded
    into ``scratch``, which must not hold anything else. The total size is checked against
    ``settings.calibration_max_bytes`` before anything is read or downloaded. upload://: the
    same as s3://, in the tenant's own uploads. ``tenant`` reads only what it may. ``location``:
    ``uri`` as parsed at submission, checked again instead of parsed again."""
    policy = SourcePolicy(settings)
    location = policy.check_calibration(uri, tenant, location)
    limit = settings.calibration_max_bytes
    if location.scheme == "file":
        # Copied, not read in place: each file is checked as it is opened, and the engine reads
        # only the copies, so nothing changed in the directory afterwards reaches the job.
        path = Path(location.path)
        check = functools.partial(_check_local_file, "calibration_data", uri, tenant, policy=policy)
        files = _local_calibration_files(uri, path, check)
        _check_size(uri, sum(file.stat().st_size for _, file in files), limit)
        scratch = Path(scratch)
        for name, file in files:
            _copy_checked(file, scratch / name, check)
        return scratch / files[0][0] if path.is_file() else scratch
    if location.scheme == "upload":
        area = upload_prefix(tenant, location.upload)
        location = location.model_copy(update={"key": "/".join(filter(None, (area, location.key)))})
        store = store or store_from_settings(settings)
    elif store is None:
        store = s3_store(settings, location.bucket)
    objects = _calibration_objects(uri, location, store)
    _check_size(uri, sum(obj.size for _, obj in objects), limit)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    for name, obj in objects:
        try:
            store.download_file(obj.key, scratch / name)
        except FileNotFoundError as exc:
            raise CalibrationDataNotFound(f"calibration_data: {uri}: {name!r} disappeared") from exc
    return scratch if location.prefix else scratch / objects[0][0]


def _check_size(uri: str, total: int, limit: int) -> None:
    if total > limit:
        raise CalibrationDataTooLarge(
            f"calibration_data: {uri} holds {total} bytes of calibration text; at most {limit} are accepted "
            "(LOFTQ_CALIBRATION_MAX_BYTES)"
        )


def _is_calibration_file(name: str) -> bool:
    """What the engine reads from a directory (loftq.calibration_data): .txt/.jsonl files,
    hidden files and folders skipped."""
    path = PurePosixPath(name)
    return path.suffix.lower() in CALIBRATION_SUFFIXES and not any(part.startswith(".") for part in path.parts)


def _local_calibration_files(uri: str, path: Path, check: Callable[[Path], None]) -> list[tuple[str, Path]]:
    """(relative name, path) of the calibration text at ``path``: the file, or the .txt/.jsonl
    files of a directory walked through its symlinks; ``check`` (``_check_local_file``)
    passes every file and directory met."""
    if path.is_file():
        _confined(check, path)
        return [(path.name, path)]
    if not path.is_dir():
        raise CalibrationDataNotFound(f"calibration_data: {uri}: no such file or directory")
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        _confined(check, Path(dirpath))
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen:  # a symlink loop, or a directory linked twice: read once
            dirnames.clear()
            continue
        seen.add(real_dir)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in sorted(filenames):
            file = Path(dirpath) / filename
            if _is_calibration_file(filename) and file.is_file():
                _confined(check, file)
                found.append((file.relative_to(path).as_posix(), file))
    if not found:
        raise CalibrationDataNotFound(f"calibration_data: {uri}: no .txt or .jsonl files in this directory")
    return found


def _confined(check: Callable[[Path], None], entry: Path) -> None:
    try:
        check(entry)
    except UnsafePath as exc:  # this field's own code: the client learns which URI to fix
        raise InvalidCalibrationSource(str(exc)) from None


def _copy_checked(source: Path, target: Path, check: Callable[[Path], None]) -> None:
    """Copy a local file after checking what was really opened (the file behind the open
    descriptor): a link swapped in after the walk's check cannot lead the copy elsewhere."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src:
        opened = Path(f"/proc/self/fd/{src.fileno()}")
        _confined(check, opened if opened.exists() else source)
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def _calibration_objects(uri: str, location: CalibrationLocation, store: ObjectStore) -> list[tuple[str, StoredObject]]:
    """(local relative name, object) of each object to download, from one listing."""
    key_prefix = f"{location.key}/" if location.prefix and location.key else location.key
    try:
        listed = store.list(key_prefix)
    except Exception as exc:
        code = s3_error_code(exc)
        if code in ("NoSuchBucket", "404", "AccessDenied", "403"):
            raise CalibrationDataNotFound(f"calibration_data: {uri}: cannot list the bucket ({code})") from exc
        raise
    if not location.prefix:
        found = [obj for obj in listed if obj.key == location.key]
        if not found:
            raise CalibrationDataNotFound(f"calibration_data: {uri}: no such object")
        return [(PurePosixPath(location.key).name, found[0])]
    objects = []
    for obj in listed:
        name = obj.key[len(key_prefix) :]
        if obj.key.endswith("/") or PurePosixPath(name).suffix.lower() not in CALIBRATION_SUFFIXES:
            continue
        try:
            safe_key(name)
        except UnsafeKey:
            raise InvalidCalibrationSource(f"calibration_data: {uri}: unsafe object name {name!r} under the prefix") from None
        if _is_calibration_file(name):
            objects.append((name, obj))
    if not objects:
        raise CalibrationDataNotFound(f"calibration_data: {uri}: no .txt or .jsonl objects under this prefix")
    return objects


# --------------------------------------------------------------------------- destination


class ObjectStoreDestination:
    """Engine output under ``prefix`` in an ObjectStore, staged one file at a time in
    ``scratch``: each file is uploaded (with its sha256 as metadata) and deleted locally as
    soon as the engine publishes it.

    Storage that stays unavailable must never leave a manifest.json claiming a complete
    checkpoint: once any upload has failed, the manifest is refused, whatever the caller does
    after the failure; a manifest whose own upload failed is deleted again (the store may have
    kept it while the reply was lost). The files
    uploaded before the failure stay, without a manifest, for a resumed run to reuse."""

    def __init__(self, store: ObjectStore, prefix: str, scratch: Path) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        if self.prefix:
            safe_key(self.prefix)
        self.scratch = Path(scratch)
        self.staging_root = self.scratch / "staging"
        self.failure: StorageUnavailable | None = None  # the first upload that failed
        self.complete = False  # the manifest is published

    def key(self, name: str) -> str:
        name = _checkpoint_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def staging_path(self, name: str) -> Path:
        path = self.staging_root / _checkpoint_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _output(self) -> str:
        return f"{self.prefix}/" if self.prefix else "the bucket root"

    def publish(self, name: str, sha256: str | None = None) -> None:
        path = self.staging_root / _checkpoint_name(name)
        if not path.is_file():
            raise LoftQError("publish called for a file that was never staged", path=name)
        if name == MANIFEST_NAME and self.failure is not None:
            raise StorageUnavailable(
                f"{MANIFEST_NAME} not written: the output under {self._output()} is incomplete, "
                f"an earlier upload failed: {self.failure.message}"
            )
        try:
            self.store.upload_file(path, self.key(name), sha256=sha256 or sha256_file(path))
        except StorageUnavailable as exc:
            withdrawn = name != MANIFEST_NAME or self._withdraw_manifest()
            state = f"has no {MANIFEST_NAME}" if withdrawn else f"may hold a {MANIFEST_NAME} that could not be deleted"
            error = StorageUnavailable(f"{exc.message}; the output under {self._output()} is incomplete and {state}")
            if self.failure is None:
                self.failure = error
            raise error from exc
        path.unlink()
        self._prune(path.parent)
        if name == MANIFEST_NAME:
            self.complete = True

    def _withdraw_manifest(self) -> bool:
        """Delete a manifest whose upload reported failure (the store may hold it anyway, the
        reply having been lost); False if that failed too."""
        try:
            self.store.delete(self.key(MANIFEST_NAME))
        except Exception:
            log.exception("could not delete %s after its upload failed", self.key(MANIFEST_NAME))
            return False
        return True

    def _prune(self, directory: Path) -> None:
        """Remove staging subdirectories left empty. The staging root stays: the engine stages
        the next shard there while another thread publishes the previous one."""
        while directory != self.staging_root and directory.is_relative_to(self.staging_root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def read_text(self, name: str) -> str | None:
        data = self.store.read_bytes(self.key(name))
        return None if data is None else data.decode("utf-8")

    def sha256(self, name: str) -> str | None:
        return self.store.sha256(self.key(name))

    @contextlib.contextmanager
    def open_local(self, name: str) -> Iterator[Path]:
        key = self.key(name)
        with _scratch_file(self.scratch, name) as path:
            try:
                self.store.download_file(key, path)
            except FileNotFoundError as exc:
                raise SourceNotFound("file is missing from the output", path=key) from exc
            yield path

    def remove(self, name: str) -> None:
        """Delete a published file or directory. After the manifest, what is removed is
        outside it (the journal): the checkpoint is complete and a storage failure here is
        logged, not raised."""
        key = self.key(name)
        try:
            self.store.delete(key)
            self.store.delete_prefix(key + "/")
        except StorageUnavailable as exc:
            if not self.complete:
                raise
            log.warning("left %s behind after a complete conversion: %s", key, exc.message)
