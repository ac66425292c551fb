"""Small Llama-shaped decoders trained from scratch, for the benchmarks that need a real model.

* ``build_tokenizer`` trains a byte-level BPE tokenizer on some text and saves it the
  transformers way; ``train_decoder`` generates a Llama-shaped decoder and trains it with AdamW
  on windows of the text (both used by bench/calibration.py and bench/memory.py, on their
  small text and shape).
* ``trained_decoder(directory)`` trains the bench's default decoder (``CORPUS_SHAPE``, 4096
  tokens) on the ``pretrain`` split of bench/corpus.py, caches it in ``directory`` under a key of
  every setting and the corpus's fingerprint (a second call with the same settings returns the
  cached one) and measures its perplexity on the ``heldout`` split.
* ``packed_windows`` / ``mean_loss``: the fixed evaluation windows and the loss on them, packed
  the way the engine packs decoder calibration text (documents joined by EOS, every window BOS
  followed by ``seq_len − 1`` tokens of the stream).

    python bench/decoder.py [--workdir DIR] [--steps N] [--batch B] [--seq-len L]   # train (or reuse) and report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import fmean

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(BENCH), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

TOKENIZER_VOCAB = 512
"""bench/calibration.py's tokenizer size (its text is about 6,600 tokens)."""
SMALL_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}
"""bench/calibration.py's decoder (``train_decoder``'s default shape)."""
CORPUS_VOCAB = 4096
CORPUS_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 4,
                "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}
"""Default shape of ``trained_decoder``: about 13.7 M parameters with the 4096-token vocabulary."""
CORPUS_TRAINING = {"steps": 200, "seq_len": 128, "batch": 8, "lr": 2e-3}
EVAL_WINDOWS = 32
"""Held-out windows evaluated while training (the final figure uses every held-out window)."""


def read_documents(path: Path) -> list[str]:
    from loftq.calibration_data import read_documents as engine_read

    return engine_read(path)[0]


def _documents(data: Path | Sequence[str]) -> list[str]:
    return list(data) if not isinstance(data, (str, Path)) else read_documents(Path(data))


def build_tokenizer(data: Path | Sequence[str], directory: Path, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A byte-level BPE tokenizer (``vocab_size`` entries) trained on the text, saved the transformers way.

    ``data``: a calibration file/directory the engine can read, or the documents themselves.
    The same recipe as the ``bpe_tokenizer_dir`` test fixture (tests/conftest.py): ``<s> … </s>``
    around a text when special tokens are asked for, ``<unk>`` declared so that
    len(tokenizer) stays the trained vocabulary."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    documents = _documents(data)
    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(documents, vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                            show_progress=False)
    bos, eos = bpe.token_to_id("<s>"), bpe.token_to_id("</s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def leading_bos(tokenizer) -> int | None:
    """BOS when the tokenizer puts it in front of what it encodes (as the engine checks), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else None


def token_stream(tokenizer, documents: Sequence[str]):
    """The documents tokenised without special tokens and joined by EOS, as one 1-d tensor."""
    import torch

    ids: list[int] = []
    for n, encoded in enumerate(tokenizer(list(documents), add_special_tokens=False)["input_ids"]):
        ids += ([tokenizer.eos_token_id] if n else []) + encoded
    return torch.tensor(ids)


def packed_windows(tokenizer, documents: Sequence[str], seq_len: int, limit: int | None = None):
    """Consecutive non-overlapping windows of the stream (BOS + seq_len − 1 tokens when the
    tokenizer leads with BOS), in order: a fixed evaluation set. At most ``limit`` windows,
    spread evenly over the stream when there are more."""
    import torch

    stream = token_stream(tokenizer, documents)
    bos = leading_bos(tokenizer)
    width = seq_len - (bos is not None)
    count = stream.numel() // width
    windows = stream[: count * width].view(count, width)
    if limit is not None and count > limit:
        windows = windows[torch.linspace(0, count - 1, limit).round().long()]
    if bos is not None:
        windows = torch.cat([torch.full((windows.shape[0], 1), bos), windows], dim=1)
    return windows


def random_windows(stream, bos: int | None, seq_len: int, batch: int, generator):
    """``batch`` training windows at random offsets of the stream (BOS-led like packed_windows)."""
    import torch

    width = seq_len - (bos is not None)
    starts = torch.randint(0, stream.numel() - width, (batch,), generator=generator)
    x = torch.stack([stream[s : s + width] for s in starts.tolist()])
    if bos is not None:
        x = torch.cat([torch.full((batch, 1), bos), x], dim=1)
    return x


def mean_loss(model, windows, batch: int = 16) -> float:
    """Mean next-token loss of ``model`` over the windows (all of one length, so per token)."""
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            x = windows[start : start + batch]
            total += float(model(input_ids=x, labels=x).loss) * x.shape[0]
    model.train(was_training)
    return total / windows.shape[0]


def train_decoder(directory: Path, data: Path | Sequence[str], steps: int, seed: int = 0, batch: int = 4,
                  seq_len: int = 64, lr: float = 2e-3, weight_decay: float = 0.1, *, shape: dict | None = None,
                  vocab_size: int = TOKENIZER_VOCAB, eval_windows=None, eval_every: int = 0,
                  log_every: int = 100) -> dict:
    """Generate, train and save (fp32 safetensors + tokenizer files) a Llama-shaped decoder.

    ``shape``: LlamaConfig fields (``SMALL_SHAPE``, bench/calibration.py's, when None). The tokenizer
    (``vocab_size`` entries) is trained on the same text. Training windows are cut, at random
    offsets, from the documents joined by EOS and start with BOS (the tokenizer adds one), as the
    engine packs decoder calibration text. AdamW, linear warm-up over 10% of the steps, then
    cosine decay. ``eval_windows`` (optional, a callable of the tokenizer returning windows) is
    evaluated every ``eval_every`` steps and at the end."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = SMALL_SHAPE if shape is None else shape
    documents = _documents(data)
    build_tokenizer(documents, directory, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    stream = token_stream(tokenizer, documents)
    bos = leading_bos(tokenizer)
    held_out = eval_windows(tokenizer) if eval_windows is not None else None
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    eval_seconds = 0.0
    model.train()
    losses: list[float] = []
    curve: list[dict] = []

    def evaluate(step: int) -> None:
        nonlocal eval_seconds
        t = time.perf_counter()
        loss = mean_loss(model, held_out)
        eval_seconds += time.perf_counter() - t
        curve.append({"step": step, "train_loss": fmean(losses[-20:]) if losses else None, "heldout_loss": loss})
        print(f"  step {step}/{steps}  held-out loss {loss:.3f} (ppl {math.exp(loss):.1f})", file=sys.stderr, flush=True)

    for step in range(steps):
        x = random_windows(stream, bos, seq_len, batch, generator)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.perf_counter() - started - eval_seconds
            print(f"  train step {step + 1}/{steps}  loss {fmean(losses[-20:]):.3f}  ({elapsed:.0f} s)",
                  file=sys.stderr, flush=True)
        if held_out is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
    seconds = time.perf_counter() - started - eval_seconds
    if held_out is not None:
        evaluate(steps)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    final = fmean(losses[-20:])
    return {"steps": steps, "batch": batch, "seq_len": seq_len, "leading_bos": bos is not None, "lr": lr,
            "weight_decay": weight_decay, "tokens_in_text": stream.numel(), "final_train_loss": final,
            "final_train_ppl": math.exp(final), "uniform_ppl": float(len(tokenizer)), "seconds": seconds,
            "parameters": sum(p.numel() for p in model.parameters()), "curve": curve}


# --------------------------------------------------------------------------- the corpus decoder


def decoder_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def trained_decoder(directory: str | Path, shape: dict | None = None, steps: int = CORPUS_TRAINING["steps"],
                    seq_len: int = CORPUS_TRAINING["seq_len"], batch: int = CORPUS_TRAINING["batch"],
                    lr: float = CORPUS_TRAINING["lr"], vocab_size: int = CORPUS_VOCAB, seed: int = 0,
                    eval_every: int = 50, log: Callable[[str], None] | None = None) -> Path:
    """A Llama-shaped decoder trained on the corpus's ``pretrain`` split, cached in ``directory``.

    The model lives in ``directory/decoder-<key>/`` (fp32 safetensors, config, tokenizer, and
    ``training.json``: settings, time, train and held-out curves, final held-out perplexity on
    every window of the ``heldout`` split); ``<key>`` hashes every setting and the corpus
    fingerprint, so a second call with the same settings on the same machine returns it at once.
    Default shape ``CORPUS_SHAPE`` (hidden 384, 6 blocks, intermediate 1024, 6 heads), a byte-level
    BPE of ``vocab_size`` tokens trained on the pretrain split, ``steps`` AdamW steps of ``batch``
    windows of ``seq_len`` tokens. Returns the model directory."""
    import corpus

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    shape = dict(CORPUS_SHAPE if shape is None else shape)
    shape["max_position_embeddings"] = max(shape.get("max_position_embeddings", seq_len), seq_len)
    settings = {"shape": shape, "steps": steps, "seq_len": seq_len, "batch": batch, "lr": lr,
                "vocab_size": vocab_size, "seed": seed, "corpus": corpus.fingerprint(), "recipe": 1}
    model_dir = Path(directory) / f"decoder-{decoder_key(settings)}"
    if (model_dir / "training.json").is_file() and (model_dir / "model.safetensors").is_file():
        log(f"[decoder] reusing {model_dir}")
        return model_dir
    parts = corpus.splits()
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"[decoder] training {model_dir.name}: {shape['num_hidden_layers']} blocks, hidden {shape['hidden_size']}, "
        f"{steps} steps of {batch}×{seq_len} tokens, vocab {vocab_size}, torch threads "
        f"{_threads()} ...")
    training = train_decoder(partial, parts["pretrain"], steps, seed=seed, batch=batch, seq_len=seq_len, lr=lr,
                             shape=shape, vocab_size=vocab_size, eval_every=eval_every,
                             eval_windows=lambda tok: packed_windows(tok, parts["heldout"], seq_len, EVAL_WINDOWS))
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(partial), local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(partial), local_files_only=True)
    started = time.perf_counter()
    windows = packed_windows(tokenizer, parts["heldout"], seq_len)
    loss = mean_loss(model, windows)
    training.update({
        "settings": settings, "heldout_windows": int(windows.shape[0]), "heldout_loss": loss,
        "heldout_ppl": math.exp(loss), "heldout_eval_seconds": time.perf_counter() - started,
        "pretrain_tokens": training["tokens_in_text"], "torch_threads": _threads(),
        "epochs": steps * batch * seq_len / training["tokens_in_text"],
    })
    (partial / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    partial.rename(model_dir)
    log(f"[decoder] trained in {training['seconds']:.0f} s; held-out ppl {training['heldout_ppl']:.1f} on "
        f"{training['heldout_windows']} windows (vocab {len(tokenizer)}); saved {model_dir}")
    return model_dir


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser(description="Train (or reuse) the corpus decoder and print its figures.")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "loftq-bench-decoders")
    parser.add_argument("--steps", type=int, default=CORPUS_TRAINING["steps"])
    parser.add_argument("--batch", type=int, default=CORPUS_TRAINING["batch"])
    parser.add_argument("--seq-len", type=int, default=CORPUS_TRAINING["seq_len"])
    parser.add_argument("--lr", type=float, default=CORPUS_TRAINING["lr"])
    parser.add_argument("--vocab", type=int, default=CORPUS_VOCAB)
    args = parser.parse_args()
    model_dir = trained_decoder(args.workdir, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                                vocab_size=args.vocab)
    training = json.loads((model_dir / "training.json").read_text())
    print(f"model: {model_dir}")
    print(f"{training['parameters']:,} parameters; {training['steps']} steps × {training['batch']} × "
          f"{training['seq_len']} tokens = {training['epochs']:.2f} epochs of {training['pretrain_tokens']:,} "
          f"pretrain tokens; {training['seconds']:.0f} s of training on {training['torch_threads']} thread(s)")
    for point in training["curve"]:
        print(f"  step {point['step']:>5}: train {point['train_loss']:.3f}  held-out ({EVAL_WINDOWS} windows) "
              f"{point['heldout_loss']:.3f}")
    print(f"held-out loss {training['heldout_loss']:.4f}, perplexity {training['heldout_ppl']:.1f} "
          f"({training['heldout_windows']} windows; uniform {training['uniform_ppl']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
