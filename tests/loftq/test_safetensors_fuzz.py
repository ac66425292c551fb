"""Property-based tests of the safetensors header reader (issue 6, hostile and broken input).

(a) Files that ShardWriter writes from random names, dtypes, shapes and metadata must read
back exactly, and agree with the ``safetensors`` library. (b) Any mutation of such a file
(bit flips, truncation, a random header length, random JSON in the entries) must either
read consistently or fail with a typed ``LoftQError`` naming the file: never another
exception, never a huge allocation, never a hang (the deadline). Derandomized and without
an example database, so CI runs the same examples and nothing is written into the repo.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors import safe_open

from loftq.errors import CorruptCheckpoint, LoftQError, SourceNotFound, UnsupportedCheckpoint
from loftq.safetensors_io import DTYPES, MAX_HEADER_BYTES, ShardWriter, SafetensorsHeader, TensorInfo, iter_tensor_bytes, read_header, read_tensor

# Hypothesis caches Unicode tables and source constants in ./.hypothesis even without a database: keep them out of the repo.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "loftq-hypothesis"))

FUZZ = settings(
    max_examples=200,
    deadline=5000,  # ms per example; real ones take a few, so only a hang or a huge read trips it
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no slow "explain" phase on failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_CODES = {CorruptCheckpoint: "corrupt_checkpoint", UnsupportedCheckpoint: "unsupported_checkpoint", SourceNotFound: "source_not_found"}

# --------------------------------------------------------------------------- strategies

_names = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).filter(lambda n: n != "__metadata__")
_shapes = st.lists(st.integers(0, 5), max_size=4).map(tuple)
_metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)


@st.composite
def _tensors(draw: st.DrawFn, min_size: int = 0) -> dict[str, torch.Tensor]:
    """Named tensors of random dtype and shape, filled with random bytes (NaN payloads, odd bools and all)."""
    names = draw(st.lists(_names, min_size=min_size, max_size=5, unique=True))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(_shapes)
        n = torch.Size(shape).numel() * dtype.itemsize
        raw = bytearray(draw(st.binary(min_size=n, max_size=n)))
        out[name] = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    return out


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(sorted(DTYPES) + ["F4", "F6_E2M3", "Q9", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
"""Any JSON value, with dtype names mixed in so that some mutations stay plausible."""

_near_ints = st.integers(-2, 2**64 + 2) | st.integers(-3, 40)


# --------------------------------------------------------------------------- helpers


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    entries = [(name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, entries, metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        writer.close()


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_reader(path: Path) -> SafetensorsHeader | None:
    """read_header either fails with a typed error naming the file, or its header is
    consistent, describes readable tensors, and agrees with the safetensors library."""
    try:
        header = read_header(path)
    except LoftQError as exc:
        event(f"read_header: {type(exc).__name__}")  # shown by --hypothesis-show-statistics
        assert exc.path == str(path) and str(path) in str(exc)
        assert exc.code == _CODES[type(exc)]
        assert type(exc) is not SourceNotFound
        return None
    event(f"read_header: accepted, {'with' if header.tensors else 'no'} tensors")
    assert read_header(path) == header
    assert header.data_start + sum(info.nbytes for info in header.tensors.values()) == path.stat().st_size
    with safe_open(path, "pt") as f:  # we are never more lenient than the reference reader
        assert set(f.keys()) == set(header.tensors)
        assert f.metadata() == header.metadata
        for name, info in header.tensors.items():
            tensor = read_tensor(path, info)
            assert tensor.dtype == info.torch_dtype and tuple(tensor.shape) == info.shape
            assert b"".join(bytes(p) for p in iter_tensor_bytes(path, info, chunk=7)) == _raw(tensor)
            assert f.get_slice(name).get_dtype() == info.dtype
            assert _raw(f.get_tensor(name)) == _raw(tensor)
    return header


def _read_stale(path: Path, infos: list[TensorInfo]) -> None:
    """TensorInfos of the file before it was damaged: a read succeeds or fails with a typed error."""
    for info in infos:
        try:
            assert len(_raw(read_tensor(path, info))) == info.nbytes
            event("stale read: ok")
        except LoftQError as exc:
            event(f"stale read: {type(exc).__name__}")
            assert exc.path == str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- (a) valid files


@FUZZ
@given(tensors=_tensors(), metadata=_metadata)
def test_valid_files_round_trip_and_agree_with_safetensors(workdir: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    path = workdir / "valid.safetensors"
    _write(path, tensors, metadata)

    header = _check_reader(path)

    assert header is not None
    assert list(header.tensors) == list(tensors), "tensors are listed in the order they were written"
    assert header.metadata == metadata
    for name, t in tensors.items():
        info = header.tensors[name]
        assert (info.dtype, info.shape) == (_dtype_name(t.dtype), tuple(t.shape))
        assert _raw(read_tensor(path, info)) == _raw(t)


# --------------------------------------------------------------------------- (b) damaged files


@st.composite
def _damage(draw: st.DrawFn, blob: bytes, header_size: int) -> bytes:
    """One or more of: bit flips or random bytes in the header, a random header length, truncation."""
    out = bytearray(blob)
    kinds = draw(st.sets(st.sampled_from(["flip", "overwrite", "length", "truncate"]), min_size=1))
    header_end = 8 + header_size
    if "flip" in kinds:
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 7)), min_size=1, max_size=4)):
            out[pos] ^= 1 << bit
    if "overwrite" in kinds:
        for pos, value in draw(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4)):
            out[pos] = value
    if "length" in kinds:
        length = draw(
            st.integers(0, 2**64 - 1)
            | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1])
            | st.integers(0, len(blob) + 16)
            | st.integers(max(0, header_size - 8), header_size + 8)
        )
        out[:8] = struct.pack("<Q", length)
    if "truncate" in kinds:
        del out[draw(st.integers(0, len(out))) :]
    return bytes(out)


@st.composite
def _json_edit(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """Replace a field of an entry, a whole entry, the metadata or add a key, with random JSON."""
    edited = json.loads(json.dumps(header))
    keys = sorted(edited)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(keys + ["__metadata__", "new"]))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", None]))
        if field == "shape" and draw(st.booleans()):
            value: Any = draw(st.lists(_near_ints, max_size=4))
        elif field == "data_offsets" and draw(st.booleans()):
            value = draw(st.lists(_near_ints, min_size=2, max_size=2))
        else:
            value = draw(_json)
        if field is None or not isinstance(edited.get(target), dict):
            edited[target] = value
        else:
            edited[target][field] = value
    return edited


def _valid_file(workdir: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[Path, bytes, list[TensorInfo]]:
    path = workdir / "damaged.safetensors"
    _write(path, tensors, metadata)
    header = read_header(path)
    return path, path.read_bytes(), list(header.tensors.values())


@FUZZ
@given(tensors=_tensors(min_size=1), metadata=_metadata, data=st.data())
def test_damaged_bytes_fail_cleanly(workdir: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, data: st.DataObject) -> None:
    path, blob, infos = _valid_file(workdir, tensors, metadata)
    header_size = struct.unpack("<Q", blob[:8])[0]
    path.write_bytes(data.draw(_damage(blob, header_size)))

    _check_reader(path)
    _read_stale(path, infos)


@FUZZ
@given(tensors=_tensors(min_size=1), metadata=_metadata, data=st.data())
def test_hostile_json_entries_fail_cleanly(workdir: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, data: st.DataObject) -> None:
    path, blob, infos = _valid_file(workdir, tensors, metadata)
    header_size = struct.unpack("<Q", blob[:8])[0]
    edited = data.draw(_json_edit(json.loads(blob[8 : 8 + header_size])))
    raw = json.dumps(edited, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw += b" " * data.draw(st.integers(0, 7))
    body = blob[8 + header_size :]
    if data.draw(st.booleans()):  # change the data buffer's size as well
        size = data.draw(st.integers(0, len(body) + 16))
        body = (body + bytes(16))[:size]
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)

    _check_reader(path)
    _read_stale(path, infos)
