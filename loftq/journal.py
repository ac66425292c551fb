"""Per-shard checkpoints of a conversion, so an interrupted run resumes where it stopped.

Output shard i depends on input shard i alone. When a shard is finished, its adapters and
layer reports are written beside the output under ``.loftq-partial/`` together with the
shard's sha256, the input shard's sha256 and a fingerprint of the options. A later run skips
every shard whose record matches its options and whose output and input files still hash to
the recorded values (a re-saved source with the same file names is converted again). The
input is hashed while it is converted, so only a resumed shard costs an extra read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
from safetensors.torch import save_file

from loftq.report import LayerReport
from loftq.storage import Destination

JOURNAL_DIR = ".loftq-partial"
FORMAT_VERSION = 4  # 2: bound to the input shard's sha256; 3: output tensor sizes; 4: objective fields per layer


def fingerprint(options_json: str, shard: str) -> str:
    return hashlib.sha256(f"{FORMAT_VERSION}\n{options_json}\n{shard}".encode()).hexdigest()


class Journal:
    def __init__(self, destination: Destination, options_json: str) -> None:
        self.destination = destination
        self.options_json = options_json

    @staticmethod
    def record_name(shard: str) -> str:
        return f"{JOURNAL_DIR}/{shard}.json"

    @staticmethod
    def adapters_name(shard: str) -> str:
        return f"{JOURNAL_DIR}/{shard}.adapters.safetensors"

    def finished(self, shard: str, source_sha256: Callable[[], str] | None) -> dict | None:
        """The shard's record if it was done with these options from this input and is intact.

        ``source_sha256`` is called only when everything else matches: it reads the input.
        None trusts the recorded input (the caller knows the parts come from this source)."""
        text = self.destination.read_text(self.record_name(shard))
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        if record.get("fingerprint") != fingerprint(self.options_json, shard):
            return None
        if self.destination.sha256(shard) != record.get("sha256"):
            return None
        if self.destination.sha256(self.adapters_name(shard)) is None:
            return None
        if source_sha256 is not None and record.get("source_sha256") != source_sha256():
            return None
        record["layers"] = [LayerReport.from_dict(layer) for layer in record["layers"]]
        return record

    def record(
        self,
        shard: str,
        source_sha256: str,
        sha256: str,
        size: int,
        tensors: dict[str, int],
        layers: list[LayerReport],
        adapters: dict[str, torch.Tensor],
    ) -> None:
        adapters_name = self.adapters_name(shard)
        save_file(adapters, str(self.destination.staging_path(adapters_name)))
        self.destination.publish(adapters_name)
        record = {
            "fingerprint": fingerprint(self.options_json, shard),
            "source_sha256": source_sha256,
            "sha256": sha256,
            "size": size,
            "tensors": tensors,
            "layers": [asdict(layer) for layer in layers],
        }
        path = self.destination.staging_path(self.record_name(shard))
        path.write_text(json.dumps(record))
        self.destination.publish(self.record_name(shard))

    def clear(self) -> None:
        self.destination.remove(JOURNAL_DIR)
