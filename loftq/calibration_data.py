"""Calibration text: read it, tokenise it with the model's own tokenizer, cut it into sequences.

Calibrated LoftQ fits each layer in the metric of the inputs the layer really sees, so the
sequences must be tokenised exactly as the model will be fed in use: hence the checkpoint's
own tokenizer, never a stand-in. Decoders are calibrated on windows cut from the
concatenated documents (every position has full context, no padding is wasted); encoders
on one document per sequence, with the special tokens they were trained with.

A held-out part is drawn first, with a seeded generator, so that evaluating the fit never
measures on what it was fitted to, and changing ``samples`` does not change what is held out.
Everything here is deterministic: the same files, tokenizer and options give identical tensors.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loftq.errors import InvalidCalibrationData
from loftq.options import CalibrationOptions

MAX_CALIBRATION_BYTES = 1 << 30
"""Calibration data above this many bytes (all files together) is refused: the text is held in
memory and fully tokenised, and a few MB is already far more than any calibration set needs."""

CALIBRATION_SUFFIXES = (".txt", ".jsonl")
"""File types read: plain text (one document per line) and JSON Lines (a "text" field per line)."""

TOKENIZER_VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)
"""Files that hold a vocabulary. transformers 5 builds an *empty* tokenizer for a directory that
has none of them (config.json alone is enough for it), which would tokenise text to nothing or
to unknown tokens without an error, so their absence is checked before loading."""

TOKENISE_CHUNK = 512
"""Documents tokenised per call: batches keep the fast tokenizers busy without holding every
document's Python token list at once."""

NO_TOKENIZER = (
    "the checkpoint has no tokenizer files (tokenizer.json / tokenizer_config.json / vocab files); "
    "calibration needs the model's own tokenizer"
)


@dataclass
class Sequences:
    """Token sequences of one split, right-padded to a common length.

    Rows are whole sequences; ``attention_mask`` is 1 on real tokens and 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask {tuple(self.attention_mask.shape)} "
                "must be matching n×L tensors"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens, the number the statistics are averaged over."""
        return int(self.attention_mask.sum())

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive slices of ``size`` rows as (input_ids, attention_mask).

        Columns that are padding in every row of a batch are cut off, so short documents are not
        pushed through the model at the length of the longest one in the whole split.
        """
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            ids = self.input_ids[start : start + size]
            mask = self.attention_mask[start : start + size]
            used = mask.any(dim=0).nonzero()
            width = int(used[-1]) + 1 if used.numel() else mask.shape[1]
            yield ids[:, :width].contiguous(), mask[:, :width].contiguous()


@dataclass
class CalibrationSet:
    """The sequences a calibrated conversion fits on and evaluates with, and where they came from."""

    calibration: Sequences
    evaluation: Sequences | None  # None when options.eval_samples == 0
    sha256: str  # of the files read (see read_documents); binds a resumed conversion to the same data
    documents: int  # non-empty documents read
    packed: bool  # windows cut from the concatenated documents, or one document per sequence
    warnings: list[str] = field(default_factory=list)  # e.g. fewer sequences than asked for


def read_documents(path: Path) -> tuple[list[str], str]:
    """Read calibration documents from a .txt or .jsonl file, or a directory of them.

    A directory contributes its ``*.txt`` and ``*.jsonl`` files, recursively, in sorted
    relative-path order (hidden files and folders are skipped). ``.txt``: every line that is not
    blank is one document (the line ending alone is removed). ``.jsonl``: every non-blank line is a
    JSON object with a string ``"text"`` field; blank texts are skipped.

    The digest is the sha256 of the file's bytes for a single file (what ``sha256sum`` prints),
    and for a directory the sha256 of the ``sha256sum``-style listing
    ``"<sha256 of file>  <relative path>\\n"`` of its files in order, so file boundaries and names
    are bound too (two directories whose concatenated bytes agree can still hold different documents).
    """
    path = Path(path)
    if not path.exists():
        raise InvalidCalibrationData("no such file or directory", path=str(path))
    if path.is_dir():
        files = _calibration_files(path)
        if not files:
            raise InvalidCalibrationData(
                f"directory holds no calibration files ({' or '.join(CALIBRATION_SUFFIXES)})", path=str(path)
            )
    elif path.suffix.lower() in CALIBRATION_SUFFIXES:
        files = [path]
    else:
        raise InvalidCalibrationData(
            f"unsupported calibration file type {path.suffix or '(none)'!r}: expected {' or '.join(CALIBRATION_SUFFIXES)}",
            path=str(path),
        )

    total = sum(f.stat().st_size for f in files)
    if total > MAX_CALIBRATION_BYTES:
        raise InvalidCalibrationData(
            f"calibration data above {_size(MAX_CALIBRATION_BYTES)} ({total} bytes in {len(files)} file(s)); "
            "a few MB of text is plenty",
            path=str(path),
        )

    documents: list[str] = []
    listing = hashlib.sha256()
    single = hashlib.sha256()
    for file in files:
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if path.is_dir():
            listing.update(f"{digest}  {file.relative_to(path).as_posix()}\n".encode())
        else:
            single.update(data)
        text = _decode(data, file)
        if file.suffix.lower() == ".jsonl":
            documents.extend(_jsonl_documents(text, file))
        else:
            documents.extend(line for line in _lines(text) if line.strip())
    if not documents:
        raise InvalidCalibrationData("no non-empty documents in the calibration data", path=str(path))
    return documents, (listing if path.is_dir() else single).hexdigest()


def load_tokenizer(tokenizer_dir: Path) -> Any:
    """The checkpoint's own tokenizer, from local files only (never the network, never remote code)."""
    tokenizer_dir = Path(tokenizer_dir)
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise InvalidCalibrationData(NO_TOKENIZER, path=str(tokenizer_dir))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... depending on the files
        raise InvalidCalibrationData(
            f"the checkpoint's tokenizer cannot be loaded ({type(exc).__name__}: {exc}); "
            "calibration needs the model's own tokenizer",
            path=str(tokenizer_dir),
        ) from exc
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise InvalidCalibrationData(f"the checkpoint's tokenizer has no vocabulary; {NO_TOKENIZER}", path=str(tokenizer_dir))
    return tokenizer


def load_calibration(
    path: Path,
    tokenizer_dir: Path,
    options: CalibrationOptions,
    *,
    packed: bool,
    max_length: int | None = None,
) -> CalibrationSet:
    """Read, tokenise and split the calibration text for one conversion.

    ``packed`` (decoders): windows of L tokens from the documents joined by EOS; otherwise
    (encoders) one document per sequence, with special tokens, truncated to L. L is
    ``options.seq_len``, capped at ``max_length`` (the model's maximum positions) when given.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    seq_len = options.seq_len if max_length is None else min(options.seq_len, max_length)
    tokenizer = load_tokenizer(tokenizer_dir)
    documents, digest = read_documents(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if packed:
        evaluation, calibration, warnings = _packed(documents, tokenizer, options, seq_len)
    else:
        evaluation, calibration, warnings = _unpacked(documents, tokenizer, options, seq_len, pad_id)
    if seq_len < options.seq_len:
        warnings = [f"seq_len {options.seq_len} is above the model's {max_length} positions; used {seq_len}", *warnings]
    return CalibrationSet(
        calibration=calibration,
        evaluation=evaluation,
        sha256=digest,
        documents=len(documents),
        packed=packed,
        warnings=warnings,
    )


def _calibration_files(directory: Path) -> list[Path]:
    files = []
    for file in directory.rglob("*"):
        relative = file.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if file.suffix.lower() in CALIBRATION_SUFFIXES and file.is_file():
            files.append(file)
    return sorted(files, key=lambda f: f.relative_to(directory).as_posix())


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n} bytes"


def _decode(data: bytes, file: Path) -> str:
    """UTF-8 (a leading byte-order mark is dropped); the error names the line of the first bad byte."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidCalibrationData(
            f"line {line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})", path=str(file)
        ) from None


def _lines(text: str) -> list[str]:
    """Lines split at \\n only (\\r\\n counts as one ending); not str.splitlines, which also splits
    at form feeds and Unicode separators that can sit inside a document."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl_documents(text: str, file: Path) -> Iterator[str]:
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidCalibrationData(
                f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})", path=str(file)
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = f"an object without a string \"text\" (keys: {sorted(record)[:5]})" if isinstance(record, dict) else type(record).__name__
            raise InvalidCalibrationData(
                f'line {number}: expected a JSON object with a string "text" field, got {got}', path=str(file)
            )
        if record["text"].strip():
            yield record["text"]


def _minimum(options: CalibrationOptions) -> int:
    """Fewest sequences a split can be made of: one to fit on, plus one to hold out if asked for."""
    return 2 if options.eval_samples > 0 else 1


def _split_counts(available: int, options: CalibrationOptions, have: str) -> tuple[int, int, list[str]]:
    """(held out, calibration, warnings) for ``available >= _minimum(options)`` sequences.

    With fewer than asked for, the held-out part shrinks to about a fifth (at least 1) and
    calibration takes the rest up to ``samples``; anything still left goes back to the held-out part.
    """
    wanted_eval, wanted_cal = options.eval_samples, options.samples
    if available >= wanted_eval + wanted_cal:
        return wanted_eval, wanted_cal, []
    n_eval = min(wanted_eval, max(1, available // 5)) if wanted_eval > 0 else 0
    n_cal = min(wanted_cal, available - n_eval)
    n_eval = min(wanted_eval, available - n_cal)
    warning = (
        f"{have}, fewer than samples={wanted_cal} + eval_samples={wanted_eval}: "
        f"using {n_cal} for calibration and {n_eval} held out"
    )
    return n_eval, n_cal, [warning]


def _packed(
    documents: list[str], tokenizer: Any, options: CalibrationOptions, seq_len: int
) -> tuple[Sequences | None, Sequences, list[str]]:
    """Windows of ``seq_len`` tokens from the documents joined by EOS, in seeded random order.

    When the tokenizer starts its sequences with BOS (Llama, Gemma: their models put an
    attention sink there and behave differently without it), every window starts with BOS
    followed by ``seq_len - 1`` tokens of the stream."""
    eos = tokenizer.eos_token_id
    bos = _leading_bos(tokenizer)
    width = seq_len - (bos is not None)
    pieces: list[torch.Tensor] = []
    for start in range(0, len(documents), TOKENISE_CHUNK):
        chunk = documents[start : start + TOKENISE_CHUNK]
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for index, ids in enumerate(encoded):
            if eos is not None and (start + index) > 0:
                ids = [eos, *ids]
            pieces.append(torch.tensor(ids, dtype=torch.int32))  # int32 halves a large stream; ids fit
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    total = stream.numel() // width
    minimum, wanted = _minimum(options), options.samples + options.eval_samples
    if total < minimum:
        raise InvalidCalibrationData(
            f"calibration text has {stream.numel()} tokens; seq_len={seq_len} needs at least {minimum * width} "
            f"({minimum} window(s) of {width} tokens{' after BOS' if bos is not None else ''}), and {wanted * width} "
            f"for samples={options.samples} + "
            f"eval_samples={options.eval_samples}"
        )
    n_eval, n_cal, warnings = _split_counts(
        total, options, have=f"calibration text has {stream.numel()} tokens, {total} window(s) of {width}"
    )
    windows = stream[: total * width].view(total, width)
    if bos is not None:
        windows = torch.cat([torch.full((total, 1), bos, dtype=windows.dtype), windows], dim=1)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(options.seed))

    def take(index: torch.Tensor) -> Sequences:
        ids = windows[index].to(torch.int64)
        return Sequences(input_ids=ids, attention_mask=torch.ones_like(ids))

    evaluation = take(order[:n_eval]) if n_eval else None
    calibration = take(order[n_eval : n_eval + n_cal])
    return evaluation, calibration, warnings


def _leading_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts it in front of what it encodes, else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _unpacked(
    documents: list[str], tokenizer: Any, options: CalibrationOptions, seq_len: int, pad_id: int
) -> tuple[Sequences | None, Sequences, list[str]]:
    """One document per sequence, with special tokens, truncated to ``seq_len``, in seeded random order.

    Documents are tokenised in the shuffled order only until enough are found, so a large corpus
    costs only the documents used.
    """
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(options.seed)).tolist()
    wanted = options.eval_samples + options.samples
    sequences: list[list[int]] = []
    for start in range(0, len(order), TOKENISE_CHUNK):
        chunk = [documents[i] for i in order[start : start + TOKENISE_CHUNK]]
        encoded = tokenizer(chunk, add_special_tokens=True, truncation=True, max_length=seq_len, verbose=False)
        sequences.extend(ids for ids in encoded["input_ids"] if ids)  # a document of nothing would be all padding
        if len(sequences) >= wanted:
            break
    minimum = _minimum(options)
    if len(sequences) < minimum:
        raise InvalidCalibrationData(
            f"calibration text has {len(sequences)} document(s); one document per sequence needs at least {minimum}, "
            f"and {wanted} for samples={options.samples} + eval_samples={options.eval_samples}"
        )
    n_eval, n_cal, warnings = _split_counts(
        len(sequences), options, have=f"calibration text has {len(sequences)} document(s)"
    )
    evaluation = _padded(sequences[:n_eval], pad_id) if n_eval else None
    calibration = _padded(sequences[n_eval : n_eval + n_cal], pad_id)
    return evaluation, calibration, warnings


def _padded(rows: list[list[int]], pad_id: int) -> Sequences:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return Sequences(input_ids=ids, attention_mask=mask)
