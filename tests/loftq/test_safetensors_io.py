"""Tests of loftq.safetensors_io: header validation, single-tensor reads, streaming shard writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loftq.errors import CorruptCheckpoint, SourceNotFound, UnsupportedCheckpoint
from loftq.safetensors_io import (
    iter_tensor_bytes,
    MAX_HEADER_BYTES,
    ShardWriter,
    TensorInfo,
    read_header,
    read_tensor,
    safetensors_dtype,
    tensor_bytes,
)
from loftq.storage import sha256_file


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "model.layer.0.q.weight": torch.randn(3, 4, generator=g),
        "model.layer.0.q.bias": torch.randn(3, generator=g).half(),
        "model.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "model.positions": torch.arange(-3, 6, dtype=torch.int64),
        "model.i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "model.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "model.u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "model.mask": torch.tensor([[True, False, True]]),
        "model.fp8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "model.scalar": torch.tensor(3.5),
        "model.scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
        "model.empty": torch.empty(0, 4),
        "model.empty_i64": torch.empty(3, 0, dtype=torch.int64),
    }


def _assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _write_raw(path: Path, header: Any, data: bytes = b"", header_len: int | None = None) -> Path:
    """A file with an arbitrary header (dict/list -> JSON, bytes as given) and data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(name, safetensors_dtype(t.dtype), tuple(t.shape)) for name, t in tensors.items()]


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    with ShardWriter(path, _entries(tensors), metadata) as writer:
        for name, t in tensors.items():
            writer.write(name, t)
        return writer.close()


# --------------------------------------------------------------------------- reading


def test_read_header_matches_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_sample_tensors(), path, metadata={"format": "pt"})

    header = read_header(path)

    assert header.path == str(path)
    assert header.data_start == 8 + header.header_size
    with safe_open(path, "pt") as f:
        assert set(header.tensors) == set(f.keys())
        assert header.metadata == f.metadata()
        for name, info in header.tensors.items():
            sliced = f.get_slice(name)
            assert info.name == name
            assert info.dtype == sliced.get_dtype()
            assert list(info.shape) == sliced.get_shape()
            assert info.torch_dtype == f.get_tensor(name).dtype
    offsets = [(info.begin, info.end) for info in header.tensors.values()]
    assert offsets == sorted(offsets), "tensors are listed in file order"
    assert offsets[-1][1] == path.stat().st_size - header.data_start


def test_read_tensor_matches_safe_open_bitwise(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_sample_tensors(), path)
    header = read_header(path)
    with safe_open(path, "pt") as f:
        for name, info in header.tensors.items():
            _assert_bitwise_equal(read_tensor(path, info), f.get_tensor(name))


def test_header_without_metadata_or_tensors(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "empty.safetensors", b"{}      ")
    header = read_header(path)
    assert header.tensors == {} and header.metadata is None


def test_read_header_missing_file_is_source_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound, match="nope.safetensors") as excinfo:
        read_header(tmp_path / "nope.safetensors")
    assert excinfo.value.code == "source_not_found"
    with pytest.raises(SourceNotFound, match="directory"):
        read_header(tmp_path)


def test_sub_byte_dtype_is_unsupported_not_corrupt(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "mxfp4.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(UnsupportedCheckpoint, match="mxfp4.safetensors") as excinfo:
        read_header(path)
    assert excinfo.value.code == "unsupported_checkpoint"


def test_read_tensor_missing_file_or_directory_is_source_not_found(tmp_path: Path) -> None:
    info = TensorInfo(name="a", dtype="F32", shape=(1,), begin=0, end=4)
    for path in (tmp_path / "gone.safetensors", tmp_path):
        with pytest.raises(SourceNotFound) as excinfo:
            read_tensor(path, info)
        assert excinfo.value.code == "source_not_found" and excinfo.value.path == str(path)


@pytest.mark.parametrize("length", [MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])
def test_read_tensor_after_header_length_changed(tmp_path: Path, length: int) -> None:
    """Found by the fuzz test: a TensorInfo read before the file changed made seek() raise OSError/OverflowError."""
    path = tmp_path / "changed.safetensors"
    save_file({"a": torch.ones(4)}, path)
    info = read_header(path).tensors["a"]
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", length))
    with pytest.raises(CorruptCheckpoint, match=r"changed\.safetensors.*exceeds the limit"):
        read_tensor(path, info)


def test_read_tensor_on_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "stub.safetensors"
    path.write_bytes(b"\0" * 5)
    with pytest.raises(CorruptCheckpoint, match="stub.safetensors.*too short"):
        read_tensor(path, TensorInfo(name="a", dtype="F32", shape=(1,), begin=0, end=4))


def test_header_of_hundreds_of_mb_is_refused_before_reading(tmp_path: Path) -> None:
    """A (sparse) file whose header really is 300 MB: refused from the length field alone."""
    size = 300 * 1024 * 1024
    path = tmp_path / "huge-header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", size) + b"{")
        f.truncate(8 + size)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpoint, match=r"huge-header\.safetensors.*exceeds the limit") as excinfo:
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert excinfo.value.code == "corrupt_checkpoint"
    assert peak < 1024 * 1024, f"read_header allocated {peak} bytes for a header it refuses"


def test_read_tensor_on_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(16)}, path)
    info = read_header(path).tensors["a"]
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors.*'a'"):
        read_tensor(path, info)


def test_tensor_bytes_is_raw_little_endian() -> None:
    assert bytes(tensor_bytes(torch.tensor([1, 256], dtype=torch.int32))) == b"\x01\0\0\0\0\x01\0\0"
    assert bytes(tensor_bytes(torch.tensor(1.0, dtype=torch.bfloat16))) == b"\x80\x3f"
    assert bytes(tensor_bytes(torch.empty(2, 0))) == b""
    with pytest.raises(ValueError, match="contiguous"):
        tensor_bytes(torch.zeros(3, 2).t())


# --------------------------------------------------------------------------- writing


def test_shard_writer_round_trip(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    path = tmp_path / "shard.safetensors"

    sha = _write_shard(path, tensors, metadata={"format": "pt", "note": "loftq"})

    assert not Path(str(path) + ".partial").exists()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path) == sha256_file(path, chunk=7)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)  # safetensors orders same-offset (empty) tensors arbitrarily
    for name, t in tensors.items():
        _assert_bitwise_equal(loaded[name], t)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "loftq"}
        for name, t in tensors.items():
            _assert_bitwise_equal(f.get_tensor(name), t)
    header = read_header(path)
    assert list(header.tensors) == list(tensors)
    for name, t in tensors.items():
        _assert_bitwise_equal(read_tensor(path, header.tensors[name]), t)

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    assert raw[8 : 8 + n].startswith(b'{"__metadata__":{')
    assert raw[8 : 8 + n].rstrip(b" ").endswith(b"}")


def test_copy_streams_raw_bytes_in_pieces(tmp_path: Path) -> None:
    source = tmp_path / "source.safetensors"
    tensors = {"big": torch.randn(300, 70), "half": torch.randn(33).to(torch.bfloat16)}
    save_file(tensors, str(source))
    header = read_header(source)
    pieces = list(iter_tensor_bytes(source, header.tensors["big"], chunk=1000))
    assert len(pieces) == -(-300 * 70 * 4 // 1000) and all(len(p) <= 1000 for p in pieces)
    out = tmp_path / "copy.safetensors"
    writer = ShardWriter(out, [(i.name, i.dtype, i.shape) for i in header.tensors.values()])
    for info in header.tensors.values():
        writer.copy(info.name, iter_tensor_bytes(source, info, chunk=1000))
    writer.close()
    for name, tensor in load_file(str(out)).items():
        assert torch.equal(tensor, tensors[name])


def test_copy_rejects_a_wrong_byte_count(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "x.safetensors", [("a", "F32", (4,))]) as writer:
        with pytest.raises(ValueError, match="8 of its 16 bytes"):
            writer.copy("a", [b"\0" * 8])
        with pytest.raises(ValueError, match="more than its 16 bytes"):
            writer.copy("a", [b"\0" * 12, b"\0" * 12])
        with pytest.raises(ValueError, match="not the next declared entry"):
            writer.copy("b", [b"\0" * 16])
        writer.abort()


def test_shard_writer_without_entries(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    _write_shard(path, {})
    assert load_file(path) == {}
    assert read_header(path).tensors == {}


def test_shard_writer_accepts_non_contiguous_tensors(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    path = tmp_path / "t.safetensors"
    _write_shard(path, {"t": t})
    _assert_bitwise_equal(load_file(path)["t"], t.contiguous())


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        ("b", torch.zeros(2, 3), "expected tensor 'a'"),
        ("a", torch.zeros(2, 3, dtype=torch.float16), "dtype"),
        ("a", torch.zeros(3, 2), "shape"),
        ("a", torch.zeros(6), "shape"),
    ],
)
def test_shard_writer_rejects_mismatch(tmp_path: Path, name: str, tensor: torch.Tensor, match: str) -> None:
    path = tmp_path / "s.safetensors"
    with ShardWriter(path, [("a", "F32", (2, 3)), ("b", "I64", ())]) as writer:
        with pytest.raises(ValueError, match=match):
            writer.write(name, tensor)
        writer.abort()


def test_shard_writer_rejects_extra_and_missing_tensors(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=r"never written: \['b'\]"):
        with ShardWriter(path, [("a", "F32", (1,)), ("b", "F32", (1,))]) as writer:
            writer.write("a", torch.zeros(1))
            writer.close()
    assert not path.exists() and not Path(str(path) + ".partial").exists()

    with ShardWriter(path, [("a", "F32", (1,))]) as writer:
        writer.write("a", torch.zeros(1))
        with pytest.raises(ValueError, match="unexpected tensor 'c'"):
            writer.write("c", torch.zeros(1))
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.write("a", torch.zeros(1))


@pytest.mark.parametrize(
    "entries",
    [
        [("a", "F32", (1,)), ("a", "F32", (1,))],
        [("__metadata__", "F32", (1,))],
        [("a", "F33", (1,))],
        [("a", "F32", (-1,))],
    ],
)
def test_shard_writer_rejects_bad_declarations(tmp_path: Path, entries: list[tuple[str, str, tuple[int, ...]]]) -> None:
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "s.safetensors", entries)
    assert list(tmp_path.iterdir()) == []


def test_abort_and_exception_leave_no_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    writer = ShardWriter(path, [("a", "F32", (2,))])
    writer.write("a", torch.zeros(2))
    writer.abort()
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(KeyError):
        with ShardWriter(path, [("a", "F32", (2,))]) as writer:
            writer.write("a", torch.zeros(2))
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unclosed_writer_leaves_only_partial(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    writer = ShardWriter(path, [("a", "F32", (2,))])
    writer.write("a", torch.zeros(2))
    try:
        assert not path.exists()
        assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors.partial"]
    finally:
        writer.abort()


# --------------------------------------------------------------------------- corrupt inputs


def _f32(begin: int, end: int, shape: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [(end - begin) // 4] if shape is None else shape, "data_offsets": [begin, end]}


CORRUPT_CASES: dict[str, tuple[Any, bytes, int | None, str]] = {
    # name: (header, data, claimed header length, expected message fragment)
    "header length beyond the file": (b"{}      ", b"", 1000, "beyond the file"),
    "header too large": (b"{}      ", b"", MAX_HEADER_BYTES + 1, "exceeds the limit"),
    "invalid json": (b'{"a": ', b"", None, "not valid UTF-8 JSON"),
    "invalid utf8": (b'{"\xff": 1}', b"", None, "not valid UTF-8 JSON"),
    "duplicate key": (b'{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":{}}', b"\0" * 4, None, "duplicate"),
    "json not an object": ([1, 2], b"", None, "not an object"),
    "entry not an object": ({"a": 3}, b"", None, "'a'"),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    "negative dim": ({"a": _f32(0, 4, [-1])}, b"\0" * 4, None, "shape"),
    "bool dim": ({"a": _f32(0, 4, [True])}, b"\0" * 4, None, "shape"),
    "float offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, b"\0" * 4, None, "data_offsets"),
    "begin after end": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4, None, "end before"),
    "offsets out of range": ({"a": _f32(0, 8), "b": _f32(100, 108)}, b"\0" * 16, None, "'b' runs past the end"),
    "overlapping offsets": ({"a": _f32(0, 8), "b": _f32(4, 12)}, b"\0" * 12, None, "'b' at [4, 12] overlaps"),
    "gap between tensors": ({"a": _f32(0, 8), "b": _f32(12, 20)}, b"\0" * 20, None, "gap of 4 bytes before tensor 'b'"),
    "trailing bytes": ({"a": _f32(0, 8)}, b"\0" * 12, None, "cover 8 bytes but the data buffer is 12"),
    "byte count mismatch": ({"a": _f32(0, 12, [2])}, b"\0" * 12, None, "needs 8"),
    "bad metadata": ({"__metadata__": {"k": 1}, "a": _f32(0, 4)}, b"\0" * 4, None, "__metadata__"),
    # header length field
    "header length 2**63": (b"{}      ", b"", 2**63, "exceeds the limit"),
    "header length 2**64-1": (b"{}      ", b"", 2**64 - 1, "exceeds the limit"),
    "header length one past the file": (b"{}      ", b"", 9, "beyond the file"),
    "empty header": (b"", b"", None, "not valid UTF-8 JSON"),
    # JSON that is not a header
    "json string": ("a", b"", None, "not an object"),
    "json null": (None, b"", None, "not an object"),
    "json number": (b"8       ", b"", None, "not an object"),
    "utf8 bom": (b"\xef\xbb\xbf{}", b"", None, "not valid UTF-8 JSON"),
    "nul padding": (b"{}\0\0\0\0\0\0", b"", None, "not valid UTF-8 JSON"),
    "lone surrogate name": (b'{"\\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', b"", None, "not valid Unicode"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, b"", None, "not valid UTF-8 JSON"),
    "5000-digit integer": (b'{"a":{"dtype":"U8","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}', b"", None, "JSON"),
    "duplicate metadata": (b'{"__metadata__":{},"__metadata__":{}}', b"", None, "duplicate"),
    "duplicate metadata key": (b'{"__metadata__":{"k":"a","k":"b"}}', b"", None, "duplicate"),
    # entries
    "missing dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype None"),
    "dtype not a string": ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    "lower-case dtype": ({"a": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
    "shape not a list": ({"a": _f32(0, 4, 1)}, b"\0" * 4, None, "shape"),  # type: ignore[arg-type]
    "float dim": ({"a": _f32(0, 4, [1.0])}, b"\0" * 4, None, "shape"),  # type: ignore[list-item]
    "string dim": ({"a": _f32(0, 4, ["1"])}, b"\0" * 4, None, "shape"),  # type: ignore[list-item]
    "huge shape product": ({"a": _f32(0, 4, [2**40] * 4)}, b"\0" * 4, None, "needs"),
    "dim beyond int64 beside a zero": ({"a": _f32(0, 0, [0, 2**64])}, b"", None, "dimension beyond"),
    "string offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4, None, "data_offsets"),
    "bool offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, b"\0" * 4, None, "data_offsets"),
    "negative offset": ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}, b"\0" * 4, None, "data_offsets"),
    "nan offset": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}', b"\0" * 4, None, "data_offsets"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, b"\0" * 4, None, "data_offsets"),
    "offsets beyond 2**64": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [2**64, 2**64 + 1]}}, b"", None, "runs past"),
    "same offsets twice": ({"a": _f32(0, 4), "b": _f32(0, 4)}, b"\0" * 4, None, "overlaps"),
    "empty tensor inside another": ({"a": _f32(0, 8), "b": _f32(4, 4)}, b"\0" * 8, None, "overlaps"),
    # metadata
    "metadata a list": ({"__metadata__": ["k"]}, b"", None, "__metadata__"),
    "metadata null value": ({"__metadata__": {"k": None}}, b"", None, "__metadata__"),
    "metadata nested": ({"__metadata__": {"k": {"x": "y"}}}, b"", None, "__metadata__"),
}


@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_corrupt_header_names_the_file(tmp_path: Path, case: str) -> None:
    header, data, header_len, fragment = CORRUPT_CASES[case]
    path = _write_raw(tmp_path / "bad-shard.safetensors", header, data, header_len)
    with pytest.raises(CorruptCheckpoint) as excinfo:
        read_header(path)
    assert excinfo.value.code == "corrupt_checkpoint"
    assert "bad-shard.safetensors" in str(excinfo.value)
    assert excinfo.value.path == str(path)
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_8_bytes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(CorruptCheckpoint, match="tiny.safetensors.*too short"):
        read_header(path)


def test_truncated_file_names_file_and_last_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"first": torch.zeros(4), "last": torch.ones(8)}, path)
    last = max(read_header(path).tensors.values(), key=lambda info: info.end).name
    os.truncate(path, path.stat().st_size - 3)
    with pytest.raises(CorruptCheckpoint, match=rf"model-00001-of-00002\.safetensors.*'{last}' runs past the end"):
        read_header(path)


def test_read_header_fuzz_only_raises_typed_errors(tmp_path: Path) -> None:
    """Damaged headers and truncations must end in a typed error, never a stray exception."""
    source = tmp_path / "valid.safetensors"
    save_file(
        {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5), "s": torch.tensor(True), "e": torch.empty(0)},
        source,
        metadata={"format": "pt"},
    )
    valid = source.read_bytes()
    data_start = read_header(source).data_start
    rng = random.Random(1234)
    target = tmp_path / "fuzzed.safetensors"
    outcomes = {"ok": 0, "corrupt": 0, "unsupported": 0}

    for _ in range(300):
        blob = bytearray(valid)
        mode = rng.choice(["flip", "randomise", "truncate", "both", "data"])
        if mode in ("flip", "both"):
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(data_start)] ^= 1 << rng.randrange(8)
        if mode == "randomise":
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(data_start)] = rng.randrange(256)
        if mode == "data":  # damaged tensor bytes are not the header's business
            blob[rng.randrange(data_start, len(blob))] ^= 0xFF
        if mode in ("truncate", "both"):
            del blob[rng.randrange(len(blob)) :]
        target.write_bytes(bytes(blob))
        try:
            header = read_header(target)
        except CorruptCheckpoint as exc:
            assert "fuzzed.safetensors" in str(exc)
            outcomes["corrupt"] += 1
            continue
        except UnsupportedCheckpoint:
            outcomes["unsupported"] += 1
            continue
        outcomes["ok"] += 1
        for info in header.tensors.values():  # a header that validates must describe readable tensors
            assert read_tensor(target, info).numel() == torch.Size(info.shape).numel()

    assert outcomes["corrupt"] > 100 and outcomes["ok"] > 30, outcomes


def test_tensor_info_properties() -> None:
    info = TensorInfo(name="x", dtype="BF16", shape=(3, 0), begin=8, end=8)
    assert info.torch_dtype == torch.bfloat16 and info.nbytes == 0
    assert TensorInfo(name="s", dtype="I64", shape=(), begin=0, end=8).nbytes == 8
