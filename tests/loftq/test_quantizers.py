"""Tests of loftq.quantizers: bit-identity with bitsandbytes, error bounds, codebooks, options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loftq.errors import InvalidOptions
from loftq.quantizers import (
    FP4_CODE,
    NF4_CODE,
    QUANTIZERS,
    CodebookQuantizer,
    Quantized,
    Quantizer,
    get_quantizer,
    normal_float_code,
    pack_4bit,
    unpack_4bit,
)

SHAPES_4BIT = [(64, 64), (384, 1536), (33, 50), (7, 3), (1, 1), (130,), (3, 5, 7), (2, 64)]
ALL_QUANTIZERS = [("nf4", 4), ("fp4", 4), ("int8", 8), ("nf2", 2), ("nf3", 3)] + [("int", b) for b in range(2, 9)]


def _weight(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


def _with_zero_blocks(shape: tuple[int, ...], blocksize: int = 64) -> torch.Tensor:
    """Random weight whose first block and (if any) trailing partial block are all zero."""
    w = _weight(shape, seed=3).reshape(-1)
    w[:blocksize] = 0
    rem = w.numel() % blocksize
    if rem:
        w[-rem:] = 0
    return w.reshape(shape)


def _on_midpoints(quant: str, numel: int = 200) -> torch.Tensor:
    """Every block holds 1.0 (so absmax is 1 and scaling is exact) and then the decision
    boundaries of the codebook, both signs: each value sits exactly on a midpoint."""
    code = NF4_CODE if quant == "nf4" else FP4_CODE
    s = code.sort().values
    mids = (s[:-1] + s[1:]) / 2
    block = torch.cat([torch.ones(1), mids, -mids, s])
    block = torch.cat([block, block.new_zeros(64 - block.numel() % 64)])[:64]
    return block.repeat(numel // 64 + 1)[:numel]


def _rounding_sensitive(quant: str, absmax: float) -> torch.Tensor:
    """A full block and a trailing partial block whose values lie within a few ulps of
    the decision boundaries, picked so that ``x * (1 / absmax)`` and ``x / absmax`` land on
    different sides of a boundary: only an exact replica of bnb's arithmetic (multiply in
    full blocks, divide in the partial one) gets every code right."""
    code = NF4_CODE if quant == "nf4" else FP4_CODE
    s = code.sort().values
    mids = (s[:-1] + s[1:]) / 2
    am = torch.tensor(absmax)
    near = (mids * am).unsqueeze(1).repeat(1, 61)
    up, down = near[:, 0].clone(), near[:, 0].clone()
    for i in range(30):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near[:, 1 + 2 * i], near[:, 2 + 2 * i] = up, down
    near = near.reshape(-1)
    mul = torch.bucketize(torch.clamp(near * (1.0 / am), -1, 1), mids)
    div = torch.bucketize(torch.clamp(near / am, -1, 1), mids)
    picked = near[mul != div][:40]
    assert picked.numel() >= 2, "construction found no rounding-sensitive values"
    block = torch.cat([am.unsqueeze(0), picked])
    full = torch.cat([block, block.new_zeros(64 - block.numel())])
    return torch.cat([full, block])  # 64 + a partial block


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns: tells -0.0 from 0.0 (fp4 has both) and compares NaNs."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --------------------------------------------------------------------------- bitsandbytes identity


@pytest.fixture(scope="module")
def bnbf():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


def _bnb_quantize_4bit(F, w: torch.Tensor, quant: str, blocksize: int = 64):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type=quant)


def _assert_4bit_identical(F, w: torch.Tensor, quant: str, blocksize: int = 64) -> None:
    packed, state = _bnb_quantize_4bit(F, w, quant, blocksize)
    qz = get_quantizer(quant, 4, blocksize)
    q = qz.quantize(w)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert q.scales.dtype == torch.float32
    assert torch.equal(q.scales, state.absmax)
    assert torch.equal(unpack_4bit(packed, w.numel()), q.codes.reshape(-1))
    # bnb pads odd counts with the code of 0.0; with the same pad the bytes are identical.
    assert torch.equal(pack_4bit(q.codes, pad=qz.zero_code), packed)
    if w.numel() % 2 == 0:
        assert torch.equal(pack_4bit(q.codes), packed)
    # Numerically equal to bnb's decode (its CPU kernel writes fp4's -0.0 code as +0.0) and
    # bit-identical to our own two-step decode.
    state.dtype = torch.float32
    fake = qz.fake_quantize(w)
    assert torch.equal(fake, F.dequantize_4bit(packed, state).reshape(w.shape))
    assert _same_bits(fake, qz.dequantize(q))


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_4bit_random_matches_bitsandbytes(bnbf, quant: str, dtype: torch.dtype) -> None:
    for i, shape in enumerate(SHAPES_4BIT):
        _assert_4bit_identical(bnbf, _weight(shape, seed=i, dtype=dtype), quant)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_zero_blocks_midpoints_and_blocksizes_match_bitsandbytes(bnbf, quant: str) -> None:
    _assert_4bit_identical(bnbf, _with_zero_blocks((33, 50)), quant)
    _assert_4bit_identical(bnbf, _with_zero_blocks((64, 64)).bfloat16(), quant)
    _assert_4bit_identical(bnbf, torch.zeros(7, 3), quant)
    _assert_4bit_identical(bnbf, _on_midpoints(quant, 200), quant)
    _assert_4bit_identical(bnbf, _on_midpoints(quant, 256).reshape(16, 16), quant)
    for absmax in (3.0, 0.3, 1.7):
        _assert_4bit_identical(bnbf, _rounding_sensitive(quant, absmax), quant)
    for blocksize in (32, 128, 256):
        _assert_4bit_identical(bnbf, _weight((33, 50), seed=blocksize), quant, blocksize)


def test_midpoints_go_to_lower_neighbour() -> None:
    qz = get_quantizer("nf4", 4)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    q = qz.quantize(torch.cat([torch.ones(1), mids]))
    assert q.codes[1:].tolist() == list(range(15))


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_4bit_dequantize_matches_bitsandbytes(bnbf, quant: str) -> None:
    qz = get_quantizer(quant, 4)
    for i, shape in enumerate([(64, 64), (33, 50), (7, 3), (130,), (2, 64)]):
        w = _with_zero_blocks(shape) if shape == (2, 64) else _weight(shape, seed=i)
        packed, state = _bnb_quantize_4bit(bnbf, w, quant)
        q = qz.quantize(w)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            state.dtype = dtype
            ref = bnbf.dequantize_4bit(packed, state)
            ours = qz.dequantize(q, dtype)
            assert ours.dtype == dtype and ours.shape == w.shape
            # bnb's CPU kernel returns (1, n) for a 1-D shape; the numbers are what count.
            assert torch.equal(ref.reshape(w.shape), ours), (shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_matches_bitsandbytes(bnbf, dtype: torch.dtype) -> None:
    qz = get_quantizer("int8", 8)
    for i, shape in enumerate([(64, 64), (33, 50), (7, 3), (1, 1)]):
        w = _weight(shape, seed=i, dtype=dtype)
        codes, stats, _ = bnbf.int8_vectorwise_quant(w.clone())
        q = qz.quantize(w)
        assert q.codes.dtype == torch.int8 and q.scales.dtype == torch.float32
        assert torch.equal(q.codes, codes)
        assert torch.equal(q.scales, stats)
        assert torch.equal(qz.dequantize(q), bnbf.int8_vectorwise_dequant(codes, stats))


def test_int8_zero_row_is_finite_and_zero() -> None:
    w = _weight((4, 16))
    w[2] = 0
    qz = get_quantizer("int8", 8)
    q = qz.quantize(w)
    assert q.scales[2] == 0 and torch.all(q.codes[2] == 0)
    out = qz.dequantize(q)
    assert torch.isfinite(out).all() and torch.all(out[2] == 0)


def test_code_tables_are_bitsandbytes(bnbf) -> None:
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnbf.get_4bit_type("fp4", device="cpu"))


def test_quantize_does_not_import_bitsandbytes() -> None:
    code = (
        "import sys, torch\n"
        "from loftq.quantizers import get_quantizer\n"
        "for name, bits in [('nf4', 4), ('fp4', 4), ('int8', 8), ('int', 3), ('nf2', 2)]:\n"
        "    qz = get_quantizer(name, bits)\n"
        "    qz.dequantize(qz.quantize(torch.randn(5, 7)))\n"
        "assert 'bitsandbytes' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- behaviour of every quantizer


@pytest.mark.parametrize(("quant", "bits"), ALL_QUANTIZERS, ids=lambda v: str(v))
def test_round_trip_within_error_bound(quant: str, bits: int) -> None:
    qz = get_quantizer(quant, bits)
    for w in (_weight((33, 50), seed=1), _weight((64, 64), seed=2).bfloat16(), _with_zero_blocks((20, 40)), torch.zeros(3, 3)):
        q = qz.quantize(w)
        assert isinstance(q, Quantized) and q.codes.shape == w.shape and q.shape == w.shape
        fake = qz.fake_quantize(w)
        assert fake.dtype == torch.float32 and fake.shape == w.shape
        assert torch.isfinite(fake).all()
        bound = qz.error_bound(w)
        assert bound.shape == w.shape
        assert torch.all((w.float() - fake).abs() <= bound)
        assert torch.all(fake[w == 0] == 0)
        assert torch.equal(qz.dequantize(q, torch.bfloat16), fake.bfloat16())
    zeros = torch.zeros(5, 64)
    assert torch.equal(qz.fake_quantize(zeros), zeros)


def test_zero_blocks_decode_to_zero() -> None:
    w = _with_zero_blocks((20, 40))
    flat_zero = torch.zeros(w.numel(), dtype=torch.bool)
    flat_zero[:64] = True
    flat_zero[-(w.numel() % 64) :] = True
    for quant, bits in ALL_QUANTIZERS:
        fake = get_quantizer(quant, bits).fake_quantize(w).reshape(-1)
        assert torch.all(fake[flat_zero] == 0), quant


def test_int_error_decreases_with_bits() -> None:
    w = _weight((128, 96), seed=5)
    errors = [
        (torch.linalg.norm(w - get_quantizer("int", bits).fake_quantize(w)) / torch.linalg.norm(w)).item()
        for bits in range(2, 9)
    ]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_int_codes_layout() -> None:
    qz = get_quantizer("int", 3, blocksize=4)  # L = 3
    w = torch.tensor([3.0, -3.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, -2.0])
    q = qz.quantize(w)
    assert q.codes.dtype == torch.uint8
    assert q.codes.tolist() == [6, 0, 4, 3, 6, 3, 3, 3, 0]
    assert q.scales.tolist() == [3.0, 0.5, 2.0]
    assert qz.fake_quantize(w).tolist() == [3.0, -3.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.0, -2.0]


@pytest.mark.parametrize(("quant", "bits"), [("nf2", 2), ("nf3", 3)])
def test_normal_float_codebooks(quant: str, bits: int) -> None:
    qz = get_quantizer(quant, bits)
    assert isinstance(qz, CodebookQuantizer)
    code = qz.code
    assert code.dtype == torch.float32 and code.numel() == 2**bits
    assert torch.equal(code, code.sort().values)
    assert code.max().item() == 1.0 and code.min().item() == -1.0
    assert (code == 0).any()
    # Asymmetric: one more positive level than negative ones.
    assert int((code > 0).sum()) == int((code < 0).sum()) + 1
    # LoftQ's positive quantiles are every 2nd (nf3) / 4th (nf2) of NF4's positive ones.
    step = 2 ** (4 - bits)
    positive = NF4_CODE[8:][step - 1 :: step]
    assert torch.allclose(code[code > 0], positive, atol=1e-6)


def test_normal_float_codebook_matches_scipy() -> None:
    from scipy.stats import norm  # LoftQ's reference builds its codebooks with scipy
    for bits in (2, 3):
        v = 2**bits
        v1 = norm.ppf(torch.linspace(0.9677083, 0.5, v // 2 + 1)[:-1]).tolist()
        v3 = (-norm.ppf(torch.linspace(0.9677083, 0.5, v // 2)[:-1])).tolist()
        ref = torch.Tensor(v1 + [0] + v3).sort().values
        ref /= ref.max()
        assert torch.equal(normal_float_code(bits), ref)


@pytest.mark.parametrize(("quant", "bits"), [("nf2", 2), ("nf3", 3)])
def test_normal_float_picks_nearest_value(quant: str, bits: int) -> None:
    qz = get_quantizer(quant, bits)
    w = _weight((64, 64), seed=7)
    q = qz.quantize(w)
    blocks = w.reshape(-1, 64)
    scaled = blocks * (1.0 / blocks.abs().max(dim=-1, keepdim=True).values)
    nearest = (scaled.unsqueeze(-1) - qz.code).abs().argmin(dim=-1)  # LoftQ's reference rule
    assert torch.equal(q.codes.reshape(-1).long(), nearest.reshape(-1))


def _fake_quantize_cases(quant: str, blocksize: int) -> list[torch.Tensor]:
    """Random weights at several scales, and every way to land on or next to a decision
    boundary or an edge of the fake-quantize cell grid, with zero and all-equal blocks and a
    partial last block."""
    qz = get_quantizer(quant, 4 if quant in ("nf4", "fp4") else int(quant[-1]), blocksize)
    s = qz.code.sort().values
    mids = (s[:-1] + s[1:]) / 2
    cells = qz._cells.cells
    edges = torch.arange(cells + 1, dtype=torch.float32) * (2 / cells) - 1
    special = torch.cat([mids, -mids, s, edges, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    near = [special]
    up, down = special.clone(), special.clone()
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        near += [up, down]
    special = torch.cat(near)
    # each block: its absmax first (1.0, so scaling is exact), then special values
    per_block = blocksize - 1
    count = -(-special.numel() // per_block)
    padded = torch.cat([special, special.new_zeros(count * per_block - special.numel())]).reshape(count, per_block)
    on_grid = torch.cat([torch.ones(count, 1), padded.clamp(-1, 1)], dim=1).reshape(-1)
    cases = [on_grid, on_grid * 0.37, on_grid[: on_grid.numel() - 5] * 3.3]  # exact, inexact scaling, partial block
    for i, scale in enumerate((0.02, 1.0, 1e-30, 3e4)):
        cases.append(_weight((37, 3 * blocksize + 5), seed=100 + i) * scale)
    w = _weight((16, blocksize), seed=200)
    w[1] = 0.0
    w[2] = 0.5
    w[3] = -2.0
    w[4, :3] = 1e-42  # subnormal
    w[5] = -0.0
    cases.append(w)
    cases.append(torch.zeros(3))
    cases.append(_weight((5, blocksize), seed=201).bfloat16())
    cases.append(_weight((5, blocksize), seed=202).half())
    return cases


@pytest.mark.parametrize(("quant", "blocksize"), [("nf4", 64), ("nf4", 32), ("fp4", 64), ("nf3", 64), ("nf2", 128)])
def test_fake_quantize_is_quantize_then_dequantize_bit_for_bit(monkeypatch, quant: str, blocksize: int) -> None:
    import loftq.quantizers.codebook as codebook

    qz = get_quantizer(quant, 4 if quant in ("nf4", "fp4") else int(quant[-1]), blocksize)
    for chunk in (1 << 17, 3 * blocksize):  # one chunk, and many with a shorter last one
        monkeypatch.setattr(codebook, "FAKE_QUANTIZE_CHUNK", chunk)
        for i, w in enumerate(_fake_quantize_cases(quant, blocksize)):
            ours = qz.fake_quantize(w)
            assert ours.dtype == torch.float32 and ours.shape == w.shape
            assert _same_bits(ours, qz.dequantize(qz.quantize(w))), (quant, blocksize, chunk, i)


def test_fake_quantize_with_a_boundary_one_ulp_below_a_cell_edge() -> None:
    # midpoint of 0 and 2·nextafter(0.5, 0) is one ulp below 0.5, an edge of the cell grid:
    # x within an ulp or two of it may be put in the cell above, whose table must still count it
    just_below = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0))
    qz = CodebookQuantizer("edge", 2, torch.stack([torch.tensor(-1.0), torch.tensor(0.0), 2 * just_below, torch.tensor(1.0)]), 64)
    around = [down := torch.tensor(0.5)]
    up = down
    for _ in range(6):
        down, up = torch.nextafter(down, torch.tensor(0.0)), torch.nextafter(up, torch.tensor(1.0))
        around += [down, up]
    block = torch.cat([torch.ones(1), torch.stack(around)])
    w = torch.cat([block, block.new_zeros(64 - block.numel())]).repeat(3)
    assert _same_bits(qz.fake_quantize(w), qz.dequantize(qz.quantize(w)))


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_fake_quantize_matches_bitsandbytes_on_many_weights(bnbf, quant: str) -> None:
    for i, w in enumerate(_fake_quantize_cases(quant, 64)):
        _assert_4bit_identical(bnbf, w, quant)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(int(torch.randint(1, 40, (1,), generator=gen)), 97, generator=gen)
        w *= torch.rand(w.shape[0], 1, generator=gen) * 10 ** float(torch.randint(-4, 4, (1,), generator=gen))
        _assert_4bit_identical(bnbf, w, quant)


def test_fake_quantize_nonfinite_blocks_match_the_two_step_path() -> None:
    qz = get_quantizer("nf4", 4)
    w = _weight((4, 64), seed=300)
    w[0, 5] = float("nan")
    w[1, 7] = float("inf")
    w[2, 9] = -float("inf")
    ours, ref = qz.fake_quantize(w), qz.dequantize(qz.quantize(w))
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours[3], ref[3])


def test_nf4_requantize_is_idempotent() -> None:
    qz = get_quantizer("nf4", 4)
    for w in (_weight((64, 64), seed=8), _weight((33, 50), seed=9), _with_zero_blocks((20, 40))):
        q1 = qz.quantize(w)
        q2 = qz.quantize(qz.dequantize(q1))
        assert torch.equal(q1.codes, q2.codes)
        assert torch.equal(q1.scales, q2.scales)


def test_fp4_requantize_keeps_values() -> None:
    # fp4 has two zero codes (+0 and -0); bnb sends tiny positive values to -0, so codes may
    # switch between the two, but the decoded values must not change.
    qz = get_quantizer("fp4", 4)
    w = _weight((33, 50), seed=10)
    once = qz.fake_quantize(w)
    assert torch.equal(qz.fake_quantize(once), once)


def test_pack_unpack_round_trip() -> None:
    codes = torch.randint(0, 16, (7, 3), dtype=torch.uint8)
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (11, 1)
    assert int(packed[0, 0]) == (int(codes.reshape(-1)[0]) << 4) | int(codes.reshape(-1)[1])
    assert int(packed[-1, 0]) & 0xF == 0
    assert torch.equal(unpack_4bit(packed, codes.numel()), codes.reshape(-1))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("quant", "bits", "blocksize"),
    [
        ("nf4", 3, 64),
        ("fp4", 8, 64),
        ("int8", 4, 64),
        ("nf2", 3, 64),
        ("nf3", 2, 64),
        ("int", 1, 64),
        ("int", 9, 64),
        ("nf5", 5, 64),
        ("", 4, 64),
        ("nf4", 4, 0),
        ("int", 4, -8),
    ],
)
def test_get_quantizer_rejects_bad_combinations(quant: str, bits: int, blocksize: int) -> None:
    with pytest.raises(InvalidOptions):
        get_quantizer(quant, bits, blocksize)


def test_get_quantizer_accepts_good_combinations() -> None:
    for quant, bits in ALL_QUANTIZERS:
        qz = get_quantizer(quant, bits, 128)
        assert qz.name == quant and qz.bits == bits
        assert qz.blocksize == (None if quant == "int8" else 128)
    assert get_quantizer("int", 4, 1).blocksize == 1


def test_every_registered_quantizer_builds_as_registered() -> None:
    """The registry (names and widths, torch-free) and the implementations it names agree."""
    assert sorted((name, bits) for name, spec in QUANTIZERS.items() for bits in spec.bits) == sorted(ALL_QUANTIZERS)
    for name, spec in QUANTIZERS.items():
        for bits in spec.bits:
            qz = spec.build(bits, 64)
            assert isinstance(qz, Quantizer) and (qz.name, qz.bits) == (name, bits)
    with pytest.raises(InvalidOptions, match="expected one of nf4, fp4, int8, int, nf2, nf3"):
        get_quantizer("q5", 4)
