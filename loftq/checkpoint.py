"""Finding the weight files of a Hugging Face checkpoint, and refusing what we will not read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from loftq.errors import CorruptCheckpoint, NoSafetensors, PickleCheckpoint, UnsupportedCheckpoint
from loftq.storage import MANIFEST_NAME, REPORT_NAME, safe_relative

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files a LoftQ conversion writes; never copied from a source that happens to hold them.
OUTPUT_ONLY = (MANIFEST_NAME, REPORT_NAME)
OUTPUT_DIRS = ("loftq_init", ".loftq-partial")


@dataclass(frozen=True)
class SourceCheckpoint:
    shards: list[str]  # weight files, in output order
    index: dict | None  # the parsed model.safetensors.index.json, if sharded
    aux_files: list[str]  # config, tokenizer and other files copied unchanged


def _is_root(name: str) -> bool:
    return "/" not in name


def discover(files: list[str], index_text: str | None) -> SourceCheckpoint:
    """Pick the backbone's safetensors files; refuse pickle-only checkpoints."""
    root_safetensors = sorted(f for f in files if _is_root(f) and f.endswith(".safetensors"))
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    index = None
    if index_text is not None:
        try:
            index = json.loads(index_text)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptCheckpoint(f"invalid index: {exc}", path=INDEX_NAME) from exc
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            safe_relative(shard)  # a hostile index must not name files outside the checkpoint
            if shard not in files:
                raise CorruptCheckpoint(f"the index names shard {shard!r}, which is missing", path=shard)
            if not _is_root(shard) or not shard.endswith(".safetensors"):
                raise CorruptCheckpoint(f"the index names {shard!r}, not a safetensors file beside it", path=INDEX_NAME)
    elif SINGLE_NAME in root_safetensors:
        shards = [SINGLE_NAME]
    elif len(root_safetensors) == 1:
        shards = root_safetensors
    elif root_safetensors:
        raise CorruptCheckpoint(
            f"{len(root_safetensors)} safetensors files but no {INDEX_NAME} to say which hold the model", path=INDEX_NAME
        )
    elif pickles:
        raise PickleCheckpoint(
            "only pickle weights found (" + ", ".join(pickles[:3]) + "); pickle files are not loaded (unpickling runs "
            "arbitrary code). Convert the model to safetensors first, e.g. model.save_pretrained(dir, safe_serialization=True).",
            path=pickles[0],
        )
    else:
        beside = sorted(f for f in files if f.endswith(".safetensors"))
        hint = f" (only in subdirectories: {', '.join(beside[:3])})" if beside else ""
        raise NoSafetensors(
            f"no safetensors weights in the checkpoint{hint}; expected {SINGLE_NAME}, or shards with {INDEX_NAME}, "
            "at the top of the directory or prefix"
        )
    if "config.json" not in files:
        raise UnsupportedCheckpoint("config.json is missing: it is needed to find the linear layers", path="config.json")

    weights = set(shards) | {INDEX_NAME}
    aux = [
        f
        for f in files
        if f not in weights
        and not f.endswith(PICKLE_SUFFIXES)
        and not any(part.startswith(".") for part in PurePosixPath(f).parts)
        and f not in OUTPUT_ONLY
        and PurePosixPath(f).parts[0] not in OUTPUT_DIRS
    ]
    return SourceCheckpoint(shards=shards, index=index, aux_files=aux)
