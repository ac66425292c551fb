"""Validated reading and streaming writing of safetensors files.

The converter holds one tensor in memory at a time, whatever the size of a shard. The
``safetensors`` library can read lazily but can only write a whole dict of tensors at
once, and its errors rarely say which file is at fault. So this module

* checks a file's header before anything trusts it (every error names the file),
* reads single tensors by offset without touching the rest of the file, and
* writes a shard as a stream: the header is known in advance (names, dtypes, shapes),
  so it goes first, then each tensor's bytes in the declared order, into ``.partial``
  which is renamed into place only once complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

from loftq.errors import CorruptCheckpoint, SourceNotFound, UnsupportedCheckpoint
from loftq.pipeline import Background

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Refuse larger headers: real ones are kilobytes, a huge length means a damaged file."""

_ALIGN = 8
_METADATA_KEY = "__metadata__"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64,
}
"""safetensors dtype name -> torch dtype, for every dtype we can read and write."""

_SAFETENSORS_NAMES = {dtype: name for name, dtype in DTYPES.items()}

_SUB_BYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
"""Valid safetensors dtypes whose elements are packed below one byte; we do not handle them."""


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are relative to the start of the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: the tensors cover the data buffer exactly, in offset order."""

    path: str
    header_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (ValueError if the format has none)."""
    try:
        return _SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no safetensors equivalent") from None


# --------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of ``path`` without reading the tensor data.

    Raises ``SourceNotFound`` if there is no such file, ``UnsupportedCheckpoint`` for valid
    but sub-byte dtypes, and ``CorruptCheckpoint`` for anything that contradicts the format
    or the file's size (a truncated file names the tensor that runs past the end).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise CorruptCheckpoint(f"file is {file_size} bytes, too short for a safetensors header", path=p)
            header_size = int.from_bytes(f.read(8), "little")
            if header_size > MAX_HEADER_BYTES:
                raise CorruptCheckpoint(
                    f"header length {header_size} exceeds the limit of {MAX_HEADER_BYTES} bytes", path=p
                )
            if 8 + header_size > file_size:
                raise CorruptCheckpoint(
                    f"header length {header_size} beyond the file ({file_size} bytes)", path=p
                )
            raw = f.read(header_size)
    except FileNotFoundError:
        raise SourceNotFound("no such file", path=p) from None
    except IsADirectoryError:
        raise SourceNotFound("is a directory, not a safetensors file", path=p) from None
    if len(raw) != header_size:
        raise CorruptCheckpoint(f"file ended inside the {header_size}-byte header", path=p)

    parsed = _parse_json(raw, p)
    metadata = _parse_metadata(parsed.pop(_METADATA_KEY, None), p)
    infos = sorted(
        (_parse_entry(name, entry, p) for name, entry in parsed.items()),
        key=lambda info: (info.begin, info.end),
    )
    _check_layout(infos, file_size - 8 - header_size, p)
    return SafetensorsHeader(
        path=p,
        header_size=header_size,
        tensors={info.name: info for info in infos},
        metadata=metadata,
    )


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Also refuses lone surrogates (``"\\ud800"``): Python's JSON accepts them, but a name or
    metadata value that cannot be encoded as UTF-8 would fail later, far from the file."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"string {text!r} is not valid Unicode") from None
        out[key] = value
    return out


def _parse_json(raw: bytes, path: str) -> dict[str, Any]:
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptCheckpoint(f"header is not valid UTF-8 JSON: {exc}", path=path) from None
    if not isinstance(parsed, dict):
        raise CorruptCheckpoint(f"header is a JSON {type(parsed).__name__}, not an object", path=path)
    return parsed


def _parse_metadata(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CorruptCheckpoint(f"{_METADATA_KEY} must map strings to strings", path=path)
    return value


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``bool`` is an ``int`` subclass in Python, so exclude it)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_MAX_DIM = 2**63 - 1
"""torch sizes are int64: a larger dimension (possible beside a zero one) could not be reshaped."""


def _parse_entry(name: str, entry: Any, path: str) -> TensorInfo:
    def bad(why: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"tensor {name!r}: {why}", path=path)

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if isinstance(dtype, str) and dtype in _SUB_BYTE_DTYPES:
        raise UnsupportedCheckpoint(f"tensor {name!r}: sub-byte dtype {dtype} is not supported", path=path)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if any(d > _MAX_DIM for d in shape):
        raise bad(f"shape {shape!r} has a dimension beyond {_MAX_DIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets {offsets} end before they begin")
    info = TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)
    if end - begin != info.nbytes:
        raise bad(f"data_offsets {offsets} span {end - begin} bytes but {dtype}{list(shape)} needs {info.nbytes}")
    return info


def _check_layout(infos: list[TensorInfo], buffer_size: int, path: str) -> None:
    """Tensors (sorted by offset) must tile the data buffer exactly: no gap, no overlap, no slack."""
    position = 0
    for info in infos:
        if info.end > buffer_size:
            raise CorruptCheckpoint(
                f"tensor {info.name!r} runs past the end of the file (data_offsets "
                f"[{info.begin}, {info.end}], data buffer is {buffer_size} bytes); truncated?",
                path=path,
            )
        if info.begin < position:
            raise CorruptCheckpoint(
                f"tensor {info.name!r} at [{info.begin}, {info.end}] overlaps the previous tensor (ends at {position})",
                path=path,
            )
        if info.begin > position:
            raise CorruptCheckpoint(
                f"gap of {info.begin - position} bytes before tensor {info.name!r} at offset {info.begin}", path=path
            )
        position = info.end
    if position != buffer_size:
        raise CorruptCheckpoint(
            f"tensors cover {position} bytes but the data buffer is {buffer_size} bytes", path=path
        )


def read_tensor(path: str | os.PathLike[str], info: TensorInfo, device: str | torch.device = "cpu") -> torch.Tensor:
    """Read one tensor's bytes (and nothing else) from ``path``, as described by ``info``.

    ``info`` comes from ``read_header(path)``; the header length is re-read (8 bytes) to
    locate the data buffer, so a ``TensorInfo`` stays independent of its file.
    """
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    for _ in iter_tensor_bytes(path, info, into=memoryview(buffer.numpy())):
        pass
    tensor = buffer.view(info.torch_dtype).reshape(info.shape)
    return tensor if torch.device(device).type == "cpu" else tensor.to(device)


def iter_tensor_bytes(
    path: str | os.PathLike[str], info: TensorInfo, *, chunk: int = 8 << 20, into: memoryview | None = None
) -> Iterator[memoryview]:
    """Yield one tensor's raw bytes in pieces, so a tensor can be copied without holding it.

    With ``into`` (a buffer of ``info.nbytes``) the pieces are read straight into it.
    """
    p = os.fspath(path)
    nbytes = info.nbytes
    buffer = into if into is not None else memoryview(bytearray(min(chunk, nbytes)))
    try:
        with open(p, "rb", buffering=0) as f:
            head = f.read(8)
            if len(head) != 8:
                raise CorruptCheckpoint("file is too short for a safetensors header", path=p)
            header_size = int.from_bytes(head, "little")
            if header_size > MAX_HEADER_BYTES:  # the file changed since read_header; seek would fail
                raise CorruptCheckpoint(
                    f"header length {header_size} exceeds the limit of {MAX_HEADER_BYTES} bytes", path=p
                )
            f.seek(8 + header_size + info.begin)
            done = 0
            while done < nbytes:
                window = buffer[done:] if into is not None else buffer[: min(len(buffer), nbytes - done)]
                n = f.readinto(window)
                if not n:
                    raise CorruptCheckpoint(
                        f"tensor {info.name!r}: file ended after {done} of its {nbytes} bytes", path=p
                    )
                done += n
                yield window[:n]
    except FileNotFoundError:
        raise SourceNotFound("no such file", path=p) from None
    except IsADirectoryError:
        raise SourceNotFound("is a directory, not a safetensors file", path=p) from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw (little-endian, as safetensors stores them) bytes of a contiguous CPU tensor, without a copy."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"tensor_bytes needs a contiguous CPU tensor, got device={t.device}, contiguous={t.is_contiguous()}")
    # reshape(-1) first: view(uint8) refuses 0-d tensors whose element size differs.
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Streams one safetensors file: header first, then tensors in the declared order.

    Bytes go to ``path + ".partial"``; ``close()`` renames it into place, so a crashed or
    aborted conversion never leaves a file that looks complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.partial_path = self.path + ".partial"
        self._entries = self._plan(entries)
        header = self._header_bytes(self._entries, metadata)
        self._digest = hashlib.sha256()
        self._hasher = Background(depth=4, name="sha256")
        self._next = 0
        self._done = False
        self._file = open(self.partial_path, "wb")
        try:
            self._emit(len(header).to_bytes(8, "little"))
            self._emit(header)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _plan(entries: list[tuple[str, str, tuple[int, ...]]]) -> list[TensorInfo]:
        """Validate the entries and lay them out back to back."""
        planned: list[TensorInfo] = []
        seen: set[str] = set()
        offset = 0
        for name, dtype, shape in entries:
            if not isinstance(name, str) or name == _METADATA_KEY or name in seen:
                raise ValueError(f"invalid or duplicate tensor name {name!r}")
            if dtype not in DTYPES:
                raise ValueError(f"tensor {name!r}: unsupported safetensors dtype {dtype!r}")
            shape = tuple(shape)
            if not all(_is_count(d) for d in shape):
                raise ValueError(f"tensor {name!r}: shape {shape} is not a tuple of non-negative integers")
            seen.add(name)
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            planned.append(TensorInfo(name=name, dtype=dtype, shape=shape, begin=offset, end=offset + nbytes))
            offset += nbytes
        return planned

    @staticmethod
    def _header_bytes(entries: list[TensorInfo], metadata: dict[str, str] | None) -> bytes:
        header: dict[str, Any] = {}
        if metadata is not None:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError("metadata must map strings to strings")
            header[_METADATA_KEY] = metadata
        for info in entries:
            header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % _ALIGN)
        if len(raw) > MAX_HEADER_BYTES:
            raise ValueError(f"header of {len(raw)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
        return raw

    def _emit(self, data: bytes | memoryview) -> None:
        """Hashing runs on its own thread, beside the writes (sha256 is as slow as a disk):
        ``data`` must not change afterwards, which is why ``copy`` takes its own chunks."""
        self._file.write(data)
        self._hasher.submit(lambda: self._digest.update(data))

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: writer is already closed or aborted")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the declared entry in name, dtype and shape."""
        self._check_open()
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: unexpected tensor {name!r}, all {len(self._entries)} entries are written")
        info = self._entries[self._next]
        if name != info.name:
            raise ValueError(f"{self.path}: expected tensor {info.name!r} next, got {name!r}")
        if tensor.dtype != info.torch_dtype:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, declared {info.dtype}")
        if tuple(tensor.shape) != info.shape:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, declared {info.shape}")
        self._emit(tensor_bytes(tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()))
        self._next += 1

    def copy(self, name: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Append the next tensor from its raw bytes (already in the declared dtype and shape)."""
        self._check_open()
        if self._next >= len(self._entries) or self._entries[self._next].name != name:
            raise ValueError(f"{self.path}: tensor {name!r} is not the next declared entry")
        info = self._entries[self._next]
        written = 0
        for chunk in chunks:
            written += len(chunk)
            if written > info.nbytes:
                raise ValueError(f"{self.path}: tensor {name!r} got more than its {info.nbytes} bytes")
            self._emit(bytes(chunk))  # the caller may reuse its buffer
        if written != info.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} got {written} of its {info.nbytes} bytes")
        self._next += 1

    def close(self) -> str:
        """Make the file durable and move it into place; returns its sha256 hex digest."""
        self._check_open()
        if self._next != len(self._entries):
            missing = [info.name for info in self._entries[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were never written: {missing[:5]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._hasher.join()
        os.replace(self.partial_path, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        self._done = True
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Discard the partial file; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._hasher.close()
        try:
            os.remove(self.partial_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


def _fsync_dir(directory: str) -> None:
    """Persist a rename; not every platform lets a directory be opened, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
