"""A deterministic English text corpus from files every Debian machine has, in four disjoint splits.

Documents:

* the licence texts in ``/usr/share/common-licenses`` (symlinks resolved, identical texts once);
* the ``copyright`` file of every package, ``/usr/share/doc/*/copyright`` (symlinks resolved;
  identical files once; files under ``MIN_DOC_BYTES`` skipped). Machine-readable (DEP-5) files are
  lightly cleaned: the fields that are file lists or URLs (``Format``, ``Files``, ``Files-Excluded*``,
  ``Files-Included*``, ``Source``) are dropped, and the continuation lines of the others lose their
  leading space (a lone ``.`` becomes a blank line), so licence texts and comments read as prose.

Every document is cut to ``MAX_DOC_CHARS`` (at a line boundary) so that one huge file (Boost's
copyright lists thousands of source files) cannot dominate a split. Then every *long*
paragraph (≥ ``DEDUP_PARAGRAPH_CHARS`` characters, whitespace-normalised) is kept only in the
first document, in order of the documents' sha256, that has it, so that licence boilerplate
inlined in many copyright files is not shared between the splits (the held-out text is not the
training text again); a document left under ``MIN_DOC_CHARS`` is dropped.

Split by whole documents into ``pretrain`` (70 %: what the bench decoders are trained on),
``calibration`` (10 %: what conversions are calibrated on), ``finetune`` (10 %: LoRA fine-tuning
text) and ``heldout`` (10 %: evaluation only), stratified by length: the documents sorted by
length are taken ten at a time, and of each ten, in order of their sha256, seven go to pretrain
and one to each other split. So the shares hold in characters as well as in documents and every
split has the same mix of short and long files (hash buckets alone put 6–14 % of the
characters in the small splits). Deterministic for a given set of files; the corpus depends on
the packages installed (``fingerprint()`` identifies it). When all documents together exceed
``max_chars`` a deterministic subsample (documents in order of a second hash) is kept; at the
default cap (20 M characters) this does not happen on a usual system (about 2 M).

    python bench/corpus.py                      # per-split documents and characters
    python bench/corpus.py --write DIR          # also DIR/<split>.jsonl

``write_split(name, path)`` writes one document per line as JSON Lines (``{"text": ...}``), the
format ``loftq.calibration_data.read_documents`` reads (``--calibration-data``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
MIN_DOC_BYTES = 500
MIN_DOC_CHARS = 250
"""A document left shorter than this by the paragraph deduplication is dropped."""
MAX_DOC_CHARS = 60_000
DEDUP_PARAGRAPH_CHARS = 200
MAX_TOTAL_CHARS = 20_000_000
SPLITS = {"pretrain": 70, "calibration": 10, "finetune": 10, "heldout": 10}
"""Split name -> percent of the documents (multiples of 10: see ``assign``)."""

_DROPPED_FIELDS = re.compile(r"^(Format|Files|Files-Excluded[\w-]*|Files-Included[\w-]*|Source)\s*:", re.IGNORECASE)
_FIELD = re.compile(r"^[A-Za-z][A-Za-z0-9-]*\s*:")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\t", "    ")
    return _CONTROL.sub("", text)


def clean_dep5(text: str) -> str:
    """Drop a DEP-5 file's file-list and URL fields and unindent the continuation lines."""
    out: list[str] = []
    dropping = False
    for line in text.split("\n"):
        if line and not line[0].isspace() and _FIELD.match(line):
            dropping = bool(_DROPPED_FIELDS.match(line))
            if not dropping:
                out.append(line)
            continue
        if not line.strip():  # a stanza ends
            dropping = False
            out.append("")
            continue
        if dropping:
            continue
        body = line[1:] if line[0] in " \t" else line
        out.append("" if body.strip() == "." else body)
    return "\n".join(out)


def _tidy(text: str) -> str:
    lines = [line.rstrip() for line in text.split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    if len(text) > MAX_DOC_CHARS:
        cut = text.rfind("\n", 0, MAX_DOC_CHARS)
        text = text[: cut if cut > MAX_DOC_CHARS // 2 else MAX_DOC_CHARS]
    return text


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def raw_documents() -> list[tuple[str, str]]:
    """(source path, cleaned text) of every distinct document, sorted by path."""
    files: list[Path] = []
    if LICENSES_DIR.is_dir():
        files += sorted(p for p in LICENSES_DIR.iterdir() if p.is_file())
    files += sorted(p for p in DOC_DIR.glob("*/copyright") if p.is_file())
    seen_bytes: set[str] = set()
    seen_text: set[str] = set()
    documents = []
    for path in files:
        real = path.resolve()
        data = real.read_bytes()
        if real.parent != LICENSES_DIR.resolve() and len(data) < MIN_DOC_BYTES:
            continue
        key = hashlib.sha256(data).hexdigest()
        if key in seen_bytes:
            continue
        seen_bytes.add(key)
        text = _decode(data)
        if text.startswith("Format:"):
            text = clean_dep5(text)
        text = _tidy(text)
        if not text or _digest(text) in seen_text:
            continue
        seen_text.add(_digest(text))
        documents.append((str(path), text))
    return documents


def _paragraph_key(paragraph: str) -> str:
    return " ".join(paragraph.split()).lower()


def _deduplicated(documents: list[str]) -> list[str]:
    """The documents in hash order, each long paragraph kept only in the first one that has it."""
    seen: set[str] = set()
    result = []
    for text in sorted(documents, key=_digest):
        paragraphs = []
        for paragraph in text.split("\n\n"):
            key = _paragraph_key(paragraph)
            if len(key) >= DEDUP_PARAGRAPH_CHARS:
                if key in seen:
                    continue
                seen.add(key)
            paragraphs.append(paragraph)
        cleaned = "\n\n".join(paragraphs).strip("\n")
        if len(cleaned) >= MIN_DOC_CHARS:
            result.append(cleaned)
    return result


def assign(documents: list[str]) -> dict[str, list[str]]:
    """Whole documents to splits, stratified by length: the documents sorted by length (ties by
    hash) are taken in groups of ten, and in each group, in order of their hash, seven go to
    pretrain and one to each other split. Every split gets the same mix of short and long
    documents, so the shares hold in documents and in characters alike."""
    pattern = [name for name, tenths in SPLITS.items() for _ in range(tenths // 10)]
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    ranked = sorted(documents, key=lambda t: (-len(t), _digest(t)))
    for start in range(0, len(ranked), len(pattern)):
        group = sorted(ranked[start : start + len(pattern)], key=_digest)
        for name, text in zip(pattern, group):
            by_split[name].append(text)
    return {name: sorted(docs, key=_digest) for name, docs in by_split.items()}


@lru_cache(maxsize=4)
def _build(max_chars: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    documents = _deduplicated([text for _, text in raw_documents()])
    if sum(len(text) for text in documents) > max_chars:  # deterministic subsample: order of a second hash
        kept, size = [], 0
        for text in sorted(documents, key=lambda t: _digest("subsample\0" + t)):
            if size + len(text) <= max_chars:
                kept.append(text)
                size += len(text)
        documents = kept
    return tuple((name, tuple(docs)) for name, docs in assign(documents).items())


def splits(max_chars: int = MAX_TOTAL_CHARS) -> dict[str, list[str]]:
    """Split name -> its documents (each a string with newlines), deterministic for a given system."""
    return {name: list(docs) for name, docs in _build(max_chars)}


def fingerprint(max_chars: int = MAX_TOTAL_CHARS) -> str:
    """sha256 over every split's documents: two machines with the same value have the same corpus."""
    digest = hashlib.sha256()
    for name, docs in _build(max_chars):
        digest.update(name.encode() + b"\0")
        for text in docs:
            digest.update(_digest(text).encode())
    return digest.hexdigest()


def write_split(name: str, path: str | Path, max_chars: int = MAX_TOTAL_CHARS) -> Path:
    """Write split ``name`` to ``path`` as JSON Lines, one ``{"text": ...}`` per document. Returns the path."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as out:
        for text in splits(max_chars)[name]:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, metavar="DIR", help="write DIR/<split>.jsonl for every split")
    parser.add_argument("--max-chars", type=int, default=MAX_TOTAL_CHARS, help="cap on all documents together")
    args = parser.parse_args()
    raw = raw_documents()
    parts = splits(args.max_chars)
    total_docs = sum(len(d) for d in parts.values())
    total_chars = sum(len(t) for d in parts.values() for t in d)
    print(f"{len(raw)} distinct documents read ({sum(len(t) for _, t in raw):,} characters after cleaning)")
    print(f"{'split':<12} {'documents':>9} {'characters':>12} {'share':>6}")
    for name, docs in parts.items():
        chars = sum(len(t) for t in docs)
        print(f"{name:<12} {len(docs):>9} {chars:>12,} {100 * chars / max(1, total_chars):>5.1f}%")
    print(f"{'total':<12} {total_docs:>9} {total_chars:>12,}")
    print(f"fingerprint {fingerprint(args.max_chars)}")
    if args.write:
        for name in parts:
            print(f"wrote {write_split(name, args.write / f'{name}.jsonl', args.max_chars)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
