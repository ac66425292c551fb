"""Calibration data: reading .txt/.jsonl, tokenising with the checkpoint's tokenizer, windows and splits,
and the tiny calibrated-test checkpoints the block-streaming pipeline is tested on."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from loftq import calibration_data
from loftq.calibration_data import (
    CalibrationSet,
    Sequences,
    load_calibration,
    load_tokenizer,
    read_documents,
)
from loftq.errors import InvalidCalibrationData
from loftq.options import CalibrationOptions


def _options(**kwargs: int) -> CalibrationOptions:
    return CalibrationOptions(**{"samples": 8, "seq_len": 16, "eval_samples": 4, "seed": 0, **kwargs})


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _stream(documents: list[str], tokenizer) -> list[int]:
    """The packed token stream, built independently: documents without special tokens, EOS between."""
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return stream


def _window_offsets(windows: torch.Tensor, stream: list[int]) -> list[int]:
    """Where each window starts in the stream (it must be at a multiple of L)."""
    length = windows.shape[1]
    starts = {tuple(stream[i : i + length]): i for i in range(0, len(stream) - length + 1, length)}
    return [starts[tuple(row.tolist())] for row in windows]


# --- reading ----------------------------------------------------------------------------------------


def test_txt_lines_are_documents(tmp_path: Path) -> None:
    raw = b"first line\r\n\n   \nsecond  line with spaces  \nthird\n"
    (tmp_path / "a.txt").write_bytes(raw)
    documents, digest = read_documents(tmp_path / "a.txt")
    assert documents == ["first line", "second  line with spaces  ", "third"]
    assert digest == hashlib.sha256(raw).hexdigest()  # a single file: what sha256sum prints


def test_txt_keeps_unicode_and_drops_bom(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9 au lait\nna\xc3\xafve \xe2\x80\xa8 r\xc3\xa9sum\xc3\xa9")
    documents, _ = read_documents(tmp_path / "a.txt")
    assert documents == ["café au lait", "naïve \u2028 résumé"]  # U+2028 does not split a document


def test_jsonl_text_fields(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "one document\nover two lines", "id": 1}),
        "",
        "   ",
        json.dumps({"text": "   "}),  # blank text: skipped
        json.dumps({"text": "Ünïcode ✓", "meta": {"x": [1, 2]}}),
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    documents, _ = read_documents(tmp_path / "d.jsonl")
    assert documents == ["one document\nover two lines", "Ünïcode ✓"]


def test_directory_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.jsonl").write_text(json.dumps({"text": "from a/z"}) + "\n")
    (tmp_path / "a" / "c.TXT").write_text("from a/c\n")
    (tmp_path / "notes.md").write_text("not calibration\n")
    (tmp_path / "data.json").write_text('{"text": "not jsonl"}\n')
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden\n")
    (tmp_path / ".y.txt").write_text("hidden too\n")
    documents, digest = read_documents(tmp_path)
    assert documents == ["from a/c", "from a/z", "from b"]

    listing = "".join(
        f"{hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}  {name}\n" for name in ["a/c.TXT", "a/z.jsonl", "b.txt"]
    )
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    assert read_documents(tmp_path) == (documents, digest)  # stable

    (tmp_path / "b.txt").write_text("from b, edited\n")
    assert read_documents(tmp_path)[1] != digest
    (tmp_path / "b.txt").write_text("from b\n")
    assert read_documents(tmp_path)[1] == digest
    (tmp_path / "a" / "new.txt").write_text("another\n")
    assert read_documents(tmp_path)[1] != digest


def test_directory_digest_binds_file_boundaries(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "a.txt").write_text("x")
    (one / "b.txt").write_text("y\n")
    (two / "a.txt").write_text("xy\n")
    (two / "b.txt").write_text("")
    assert read_documents(one)[0] != read_documents(two)[0]
    assert read_documents(one)[1] != read_documents(two)[1]


@pytest.mark.parametrize(
    ("files", "target", "message"),
    [
        ({}, "missing.txt", "no such file or directory"),
        ({"notes.md": b"text\n"}, ".", "directory holds no calibration files (.txt or .jsonl)"),
        ({}, ".", "directory holds no calibration files"),
        ({"data.csv": b"a,b\n"}, "data.csv", "unsupported calibration file type '.csv'"),
        ({"bad.txt": b"fine\nalso fine\nbroken \xff here\n"}, "bad.txt", "bad.txt: line 3: not UTF-8 text (byte 0xff at offset 22)"),
        ({"bad.jsonl": b'{"text": "ok"}\n\n{"text": "oops"\n'}, "bad.jsonl", "bad.jsonl: line 3: invalid JSON (Expecting ',' delimiter"),
        ({"bad.jsonl": b'{"text": "ok"}\n{"content": "x"}\n'}, "bad.jsonl", 'line 2: expected a JSON object with a string "text" field, got an object'),
        ({"bad.jsonl": b'{"text": 3}\n'}, "bad.jsonl", 'line 1: expected a JSON object with a string "text" field'),
        ({"bad.jsonl": b'["text"]\n'}, "bad.jsonl", 'line 1: expected a JSON object with a string "text" field, got list'),
        ({"empty.txt": b"\n  \n\t\n"}, "empty.txt", "no non-empty documents in the calibration data"),
        ({"a.txt": b"", "b.jsonl": b'{"text": ""}\n'}, ".", "no non-empty documents"),
    ],
)
def test_read_errors(tmp_path: Path, files: dict[str, bytes], target: str, message: str) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(InvalidCalibrationData, match=re.escape(message)) as info:
        read_documents(tmp_path / target)
    assert info.value.code == "invalid_calibration_data"


def test_error_in_directory_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "sub" / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(InvalidCalibrationData) as info:
        read_documents(tmp_path)
    assert info.value.path == str(tmp_path / "sub" / "bad.jsonl")
    assert "line 2: invalid JSON" in str(info.value)


def test_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert calibration_data.MAX_CALIBRATION_BYTES == 1 << 30
    monkeypatch.setattr(calibration_data, "MAX_CALIBRATION_BYTES", 1000)
    (tmp_path / "a.txt").write_text("x" * 600 + "\n")
    read_documents(tmp_path)  # 601 bytes: fine
    (tmp_path / "b.txt").write_text("y" * 600 + "\n")  # 1202 bytes in all
    with pytest.raises(InvalidCalibrationData, match="calibration data above 1000 bytes"):
        read_documents(tmp_path)


def test_size_limit_message_at_the_real_limit(tmp_path: Path) -> None:
    with open(tmp_path / "big.txt", "wb") as f:  # sparse: no GiB is written
        f.truncate((1 << 30) + 1)
    with pytest.raises(InvalidCalibrationData, match="calibration data above 1 GiB"):
        read_documents(tmp_path / "big.txt")


# --- tokenizer ---------------------------------------------------------------------------------------


def test_no_tokenizer_files(tiny_llama: Path, calibration_text: Path) -> None:
    """transformers 5 would build an empty tokenizer from config.json alone; it must be refused."""
    with pytest.raises(InvalidCalibrationData, match="the checkpoint has no tokenizer files .*calibration needs the model's own tokenizer"):
        load_calibration(calibration_text, tiny_llama, _options(), packed=True)


def test_unloadable_tokenizer(tmp_path: Path, calibration_text: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InvalidCalibrationData, match="tokenizer cannot be loaded"):
        load_tokenizer(tmp_path)


# --- packed (decoders) -------------------------------------------------------------------------------


def test_packed_windows_come_from_the_token_stream(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    options = _options(samples=10, eval_samples=5, seq_len=32)
    result = load_calibration(calibration_text, bpe_tokenizer_dir, options, packed=True)
    assert isinstance(result, CalibrationSet) and result.packed and not result.warnings
    documents, digest = read_documents(calibration_text)
    assert result.documents == len(documents) == 202
    assert result.sha256 == digest

    calibration, evaluation = result.calibration, result.evaluation
    assert evaluation is not None
    assert calibration.input_ids.shape == (10, 32) and evaluation.input_ids.shape == (5, 32)
    for seqs in (calibration, evaluation):
        assert seqs.input_ids.dtype == torch.int64 and seqs.attention_mask.dtype == torch.int64
        assert bool((seqs.attention_mask == 1).all())
        assert seqs.tokens == seqs.input_ids.numel()

    tokenizer = _tokenizer(bpe_tokenizer_dir)
    stream = _stream(documents, tokenizer)
    # the tokenizer starts sequences with BOS, so every window does, then 31 tokens of the stream
    for seqs in (calibration, evaluation):
        assert bool((seqs.input_ids[:, 0] == tokenizer.bos_token_id).all())
    cal_offsets = _window_offsets(calibration.input_ids[:, 1:], stream)
    eval_offsets = _window_offsets(evaluation.input_ids[:, 1:], stream)
    assert all(offset % 31 == 0 for offset in cal_offsets + eval_offsets)
    assert len(set(cal_offsets)) == 10 and len(set(eval_offsets)) == 5
    assert not set(cal_offsets) & set(eval_offsets)  # held out means never fitted on
    assert cal_offsets != sorted(cal_offsets)  # shuffled, not the first windows in order

    # documents are joined by EOS and carry no BOS/EOS of their own
    all_ids = torch.cat([calibration.input_ids, evaluation.input_ids])
    assert int((all_ids == tokenizer.eos_token_id).sum()) > 0
    assert int((all_ids[:, 1:] == tokenizer.bos_token_id).sum()) == 0  # only the leading one
    assert stream.count(tokenizer.eos_token_id) == len(documents) - 1


def test_packed_is_deterministic_and_seeded(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    a = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=3), packed=True)
    b = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=3), packed=True)
    c = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=4), packed=True)
    assert torch.equal(a.calibration.input_ids, b.calibration.input_ids)
    assert torch.equal(a.evaluation.input_ids, b.evaluation.input_ids)
    assert not torch.equal(a.calibration.input_ids, c.calibration.input_ids)
    assert a.sha256 == c.sha256


def test_held_out_does_not_depend_on_samples(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    few = load_calibration(calibration_text, bpe_tokenizer_dir, _options(samples=2), packed=True)
    many = load_calibration(calibration_text, bpe_tokenizer_dir, _options(samples=20), packed=True)
    assert torch.equal(few.evaluation.input_ids, many.evaluation.input_ids)
    assert torch.equal(few.calibration.input_ids, many.calibration.input_ids[:2])


def test_no_eos_means_plain_concatenation(tmp_path: Path, calibration_text: Path, minilm: Path) -> None:
    """BERT's tokenizer has no EOS: packing still works, documents simply follow each other."""
    tokenizer = _tokenizer(minilm)
    assert tokenizer.eos_token_id is None
    result = load_calibration(calibration_text, minilm, _options(seq_len=24), packed=True)
    assert result.calibration.input_ids.shape == (8, 24)
    assert not bool(torch.isin(result.calibration.input_ids, torch.tensor([101, 102])).any())  # no [CLS]/[SEP]


def test_eval_samples_zero(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    result = load_calibration(calibration_text, bpe_tokenizer_dir, _options(eval_samples=0, samples=6), packed=True)
    assert result.evaluation is None
    assert len(result.calibration) == 6


def test_max_length_caps_seq_len(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    options = _options(seq_len=512)
    capped = load_calibration(calibration_text, bpe_tokenizer_dir, options, packed=True, max_length=40)
    assert capped.calibration.input_ids.shape[1] == 40
    assert "seq_len 512 is above the model's 40 positions; used 40" in capped.warnings
    short = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seq_len=16), packed=True, max_length=40)
    assert short.calibration.input_ids.shape[1] == 16 and not short.warnings
    unpacked = load_calibration(calibration_text, bpe_tokenizer_dir, options, packed=False, max_length=10)
    assert unpacked.calibration.input_ids.shape[1] <= 10


def test_packed_shortfall_warns_and_splits(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(bpe_tokenizer_dir)
    windows = len(_stream(read_documents(calibration_text)[0], tokenizer)) // 127  # 127 tokens after BOS
    assert 20 < windows < 200  # the text is a few thousand tokens
    result = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seq_len=128, samples=500, eval_samples=16), packed=True)
    n_eval = min(16, max(1, windows // 5))
    assert len(result.evaluation) == n_eval
    assert len(result.calibration) == windows - n_eval
    assert len(result.warnings) == 1
    assert f"{windows} window(s) of 127" in result.warnings[0]
    assert f"using {windows - n_eval} for calibration and {n_eval} held out" in result.warnings[0]


def test_shortfall_leftover_goes_to_evaluation(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    """Few windows but only 2 calibration samples asked: calibration still gets 2, the rest is held out."""
    tokenizer = _tokenizer(bpe_tokenizer_dir)
    windows = len(_stream(read_documents(calibration_text)[0], tokenizer)) // 127
    result = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seq_len=128, samples=2, eval_samples=windows), packed=True)
    assert len(result.calibration) == 2
    assert len(result.evaluation) == windows - 2
    assert result.warnings


@pytest.mark.parametrize(("eval_samples", "text", "fits"), [(4, "a b c d e f g h\n", False), (0, "a b c d e f g h\n", True)])
def test_packed_minimum(tmp_path: Path, bpe_tokenizer_dir: Path, eval_samples: int, text: str, fits: bool) -> None:
    """Enough text for one window: fine without a held-out part, refused with one."""
    (tmp_path / "short.txt").write_text(text)
    tokens = len(_tokenizer(bpe_tokenizer_dir)(text.strip(), add_special_tokens=False)["input_ids"])
    options = _options(seq_len=tokens + 1, eval_samples=eval_samples)  # + BOS
    if fits:
        result = load_calibration(tmp_path / "short.txt", bpe_tokenizer_dir, options, packed=True)
        assert len(result.calibration) == 1 and result.evaluation is None and result.warnings
    else:
        with pytest.raises(
            InvalidCalibrationData,
            match=rf"calibration text has {tokens} tokens; seq_len={tokens + 1} needs at least {2 * tokens} \(2 window\(s\)",
        ):
            load_calibration(tmp_path / "short.txt", bpe_tokenizer_dir, options, packed=True)


def test_packed_too_short(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    (tmp_path / "short.txt").write_text("Just a few words.\nAnd a few more.\n")
    with pytest.raises(InvalidCalibrationData, match=r"calibration text has \d+ tokens; seq_len=512 needs at least 1022 .* 36792 for samples=64"):
        load_calibration(tmp_path / "short.txt", bpe_tokenizer_dir, CalibrationOptions(samples=64, eval_samples=8), packed=True)


# --- unpacked (encoders) -----------------------------------------------------------------------------


def test_unpacked_one_document_per_sequence(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    tokenizer = _tokenizer(bpe_tokenizer_dir)
    documents, _ = read_documents(calibration_text)
    result = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seq_len=64), packed=False)
    assert not result.packed and not result.warnings
    encoded = {tuple(tokenizer(doc)["input_ids"]) for doc in documents}
    seen = set()
    for seqs in (result.calibration, result.evaluation):
        ids, mask = seqs.input_ids, seqs.attention_mask
        lengths = mask.sum(1)
        assert ids.shape[1] == int(lengths.max())  # padded to the longest in its split, no more
        for row, m, n in zip(ids, mask, lengths.tolist()):
            assert m[:n].eq(1).all() and m[n:].eq(0).all()
            assert row[n:].eq(tokenizer.pad_token_id).all()
            tokens = tuple(row[:n].tolist())
            assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.eos_token_id
            assert tokens in encoded
            seen.add(tokens)
    assert len(seen) == 12  # 8 + 4 distinct documents: held out is disjoint from calibration


def test_unpacked_truncates(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    (tmp_path / "docs.txt").write_text("short one\n" + "a much longer document " * 20 + "\nanother short\n")
    result = load_calibration(tmp_path / "docs.txt", bpe_tokenizer_dir, _options(seq_len=10, samples=3, eval_samples=0), packed=False)
    tokenizer = _tokenizer(bpe_tokenizer_dir)
    ids, mask = result.calibration.input_ids, result.calibration.attention_mask
    assert ids.shape == (3, 10)
    long_row = int(mask.sum(1).argmax())
    assert int(mask[long_row].sum()) == 10
    assert ids[long_row, 0] == tokenizer.bos_token_id and ids[long_row, -1] == tokenizer.eos_token_id


def test_unpacked_deterministic_and_seeded(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    a = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=1), packed=False)
    b = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=1), packed=False)
    c = load_calibration(calibration_text, bpe_tokenizer_dir, _options(seed=2), packed=False)
    assert torch.equal(a.calibration.input_ids, b.calibration.input_ids)
    assert torch.equal(a.evaluation.attention_mask, b.evaluation.attention_mask)
    assert not torch.equal(a.calibration.input_ids[:, :5], c.calibration.input_ids[:, :5])


def test_unpacked_shortfall(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    (tmp_path / "docs.txt").write_text("".join(f"document number {i}\n" for i in range(7)))
    result = load_calibration(tmp_path / "docs.txt", bpe_tokenizer_dir, _options(samples=8, eval_samples=4), packed=False)
    assert (len(result.calibration), len(result.evaluation)) == (6, 1)
    assert result.warnings == [
        "calibration text has 7 document(s), fewer than samples=8 + eval_samples=4: using 6 for calibration and 1 held out"
    ]
    (tmp_path / "docs.txt").write_text("a single document\n")
    with pytest.raises(InvalidCalibrationData, match=r"calibration text has 1 document\(s\); one document per sequence needs at least 2"):
        load_calibration(tmp_path / "docs.txt", bpe_tokenizer_dir, _options(), packed=False)
    one = load_calibration(tmp_path / "docs.txt", bpe_tokenizer_dir, _options(eval_samples=0), packed=False)
    assert len(one.calibration) == 1 and one.evaluation is None


def test_minilm_own_tokenizer(calibration_text: Path, minilm: Path) -> None:
    tokenizer = _tokenizer(minilm)
    result = load_calibration(calibration_text, minilm, _options(seq_len=20), packed=False, max_length=512)
    ids, mask = result.calibration.input_ids, result.calibration.attention_mask
    lengths = mask.sum(1)
    assert bool((ids[:, 0] == tokenizer.cls_token_id).all())
    assert all(int(ids[i, n - 1]) == tokenizer.sep_token_id for i, n in enumerate(lengths.tolist()))
    assert all(bool(ids[i, n:].eq(tokenizer.pad_token_id).all()) for i, n in enumerate(lengths.tolist()))
    assert int(lengths.max()) <= 20
    assert int(ids.max()) < 30522 and tokenizer.unk_token_id not in ids[mask.bool()].tolist()


# --- Sequences ---------------------------------------------------------------------------------------


def test_batches_slice_and_trim() -> None:
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [5, 6, 7, 8, 0], [5, 0, 0, 0, 0], [5, 6, 0, 0, 0]])
    mask = (ids != 0).long()
    seqs = Sequences(input_ids=ids, attention_mask=mask)
    assert len(seqs) == 5 and seqs.tokens == 12
    batches = list(seqs.batches(2))
    assert [b[0].shape for b in batches] == [(2, 3), (2, 4), (1, 2)]
    assert torch.equal(torch.cat([torch.nn.functional.pad(b[1], (0, 5 - b[1].shape[1])) for b in batches]), mask)
    assert torch.equal(batches[1][0], ids[2:4, :4])
    assert all(b[0].is_contiguous() for b in batches)
    assert [b[0].shape for b in seqs.batches(10)] == [(5, 4)]
    with pytest.raises(ValueError):
        list(seqs.batches(0))
    with pytest.raises(ValueError):
        Sequences(input_ids=ids, attention_mask=mask[:, :3])


def test_calibration_batches_cover_everything(calibration_text: Path, bpe_tokenizer_dir: Path) -> None:
    result = load_calibration(calibration_text, bpe_tokenizer_dir, _options(samples=11, seq_len=64), packed=False)
    batches = list(result.calibration.batches(4))
    assert [len(b[0]) for b in batches] == [4, 4, 3]
    assert sum(int(m.sum()) for _, m in batches) == result.calibration.tokens


# --- the calibrated-test checkpoints -----------------------------------------------------------------

CHECKPOINTS = {
    "calib_llama": ("LlamaForCausalLM", torch.bfloat16),
    "calib_mistral": ("MistralForCausalLM", torch.float32),
    "calib_qwen2": ("Qwen2ForCausalLM", torch.float32),
    "calib_gemma": ("GemmaForCausalLM", torch.float32),
    "calib_gemma2": ("Gemma2ForCausalLM", torch.float32),
    "calib_gpt2": ("GPT2LMHeadModel", torch.float16),
    "calib_bert": ("BertModel", torch.float32),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_calibrated_checkpoint_loads(request: pytest.FixtureRequest, name: str, bpe_tokenizer_dir: Path, calibration_text: Path) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    path: Path = request.getfixturevalue(name)
    architecture, dtype = CHECKPOINTS[name]
    encoder = architecture == "BertModel"
    model = (AutoModel if encoder else AutoModelForCausalLM).from_pretrained(str(path), dtype=dtype)
    assert type(model).__name__ == architecture
    assert {p.dtype for p in model.parameters()} == {dtype}

    # the tokenizer as the checkpoint loads it (transformers may pick a model-specific class) matches the trained one
    tokenizer, reference = _tokenizer(path), _tokenizer(bpe_tokenizer_dir)
    assert len(tokenizer) == len(reference) == model.config.vocab_size
    sample = read_documents(calibration_text)[0][:5]
    assert tokenizer(sample)["input_ids"] == reference(sample)["input_ids"]

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if architecture == "GPT2LMHeadModel":
        from transformers.pytorch_utils import Conv1D

        linears = [m for m in model.modules() if isinstance(m, Conv1D)]
        assert all(m.weight.shape[0] % 64 == 0 and m.weight.shape[1] % 64 == 0 for m in linears)
    else:
        assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)
    assert linears

    result = load_calibration(calibration_text, path, _options(seq_len=64), packed=not encoder, max_length=128)
    ids, mask = next(result.calibration.batches(4))
    with torch.no_grad():
        out = model.float()(input_ids=ids, attention_mask=mask)
    values = out.last_hidden_state if encoder else out.logits
    assert bool(torch.isfinite(values).all())


def test_llama_is_sharded_and_untied(calib_llama: Path) -> None:
    shards = sorted(p.name for p in calib_llama.glob("*.safetensors"))
    assert len(shards) > 1 and (calib_llama / "model.safetensors.index.json").is_file()
    index = json.loads((calib_llama / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"]


def test_gemma2_layers_attend_differently(calib_gemma2: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(calib_gemma2))
    assert config.sliding_window == 32 and config.layer_types == ["sliding_attention", "full_attention"]
    assert config.head_dim == 16


def test_add_tokenizer_copies_files(tmp_path: Path, bpe_tokenizer_dir: Path) -> None:
    from conftest import add_tokenizer

    assert add_tokenizer(tmp_path, bpe_tokenizer_dir) == tmp_path
    assert (tmp_path / "tokenizer.json").read_bytes() == (bpe_tokenizer_dir / "tokenizer.json").read_bytes()
    assert load_tokenizer(tmp_path).eos_token == "</s>"
