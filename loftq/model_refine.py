"""Model-level refinement: every adapter trained at once against the full-precision model.

The block stage (loftq/refine.py) matches each block's output; errors that only show after
the head (which tokens become likelier) are invisible to it. This stage takes a few Adam steps
on all block adapters together, minimising the KL divergence of the initialised model's
next-token distribution to the full-precision model's (decoders with a head), or the relative
squared error of the last block's output (encoders), over the calibration sequences.

Unlike the block pass, it needs the whole model at once: every target's Q (kept as the
quantizer's codes, one byte per weight, when they rebuild Q as loaded exactly; else in the
source dtype), the other weights in fp32, the adapters with their Adam state, and one batch's
activations (each block's forward is recomputed in the backward pass, so only block inputs
are kept). ``memory_needed`` estimates that from the checkpoint before anything runs; a CPU
conversion that would not fit is refused then, naming the figure (docs/calibration.md).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from loftq.errors import Cancelled, InsufficientMemory
from loftq.quantizers.base import Quantized, Quantizer
from loftq.refine import Adapters, BlockAdapters, decay, relative_adam, relative_error
from loftq.report import ModelRefinement

HELD_BYTES_PER_WEIGHT = 1.25
"""A target weight held as codes: one byte per weight plus its block scales (and slack)."""

ADAPTER_STATE = 4
"""fp32 copies per adapter parameter while training: the value, its gradient, Adam's two moments."""


@dataclass
class HeldWeight:
    """A target's Q as loaded, as the quantizer's codes when they rebuild it bit for bit."""

    codes: Quantized | None
    dense: torch.Tensor | None
    dtype: torch.dtype

    @classmethod
    def of(cls, q_loaded: torch.Tensor, quantizer: Quantizer, dtype: torch.dtype) -> HeldWeight:
        codes = quantizer.quantize(q_loaded)
        if torch.equal(quantizer.dequantize(codes, dtype=dtype).float(), q_loaded):
            return cls(codes, None, dtype)
        return cls(None, q_loaded.to(dtype) if torch.equal(q_loaded.to(dtype).float(), q_loaded) else q_loaded, dtype)

    def matrix(self, quantizer: Quantizer) -> torch.Tensor:
        if self.codes is not None:
            return quantizer.dequantize(self.codes, dtype=self.dtype).float()
        assert self.dense is not None
        return self.dense.float()


def available_memory() -> int | None:
    """Bytes this process may still allocate on the host: the smaller of what the kernel reports
    available and what an address-space limit (a service worker's job limit) leaves."""
    candidates = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status") as status:
                size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
            candidates.append(max(0, soft - size))
        except (OSError, ValueError, StopIteration):
            pass
    return min(candidates) if candidates else None


def memory_needed(target_weights: int, other_weights: int, adapter_weights: int, activation_bytes: int) -> int:
    """Bytes the stage holds: targets as codes, the rest fp32, the adapters' training state, activations."""
    return int(target_weights * HELD_BYTES_PER_WEIGHT + other_weights * 4 + adapter_weights * 4 * ADAPTER_STATE + activation_bytes)


def check_memory(needed: int, device: torch.device) -> None:
    """Refuse before the conversion starts when the stage cannot fit (CPU: host memory or the
    job's limit; CUDA: the device's free memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have, where = free, f"{device} has"
    else:
        have, where = available_memory(), "this machine has"
    if have is not None and needed > have:
        raise InsufficientMemory(
            f"refine with the model stage holds the whole model: it needs about {needed / 2**30:.1f} GiB and {where} "
            f"{have / 2**30:.1f} GiB available; use refine='block' (one block at a time), a machine with more memory, "
            "or a GPU"
        )


@dataclass
class Batch:
    """One calibration batch as the model stage sees it."""

    embedded: torch.Tensor  # block 0's input
    inputs: list  # per block: what the model passed it besides the hidden states (blockwise.BlockInputs)
    mask: torch.Tensor
    teacher: torch.Tensor  # the full-precision model's last block output


Forward = Callable[[int, torch.Tensor, object], torch.Tensor]
Head = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], list[tuple[torch.Tensor, torch.Tensor]]]


class ModelStage:
    """Trains the adapters of every block together (see the module docstring)."""

    def __init__(
        self,
        forward: Forward,
        blocks: int,
        adapters: BlockAdapters,
        head: Head | None,
        options,  # noqa: ANN001 - loftq.options.RefineOptions
        seed: int,
        should_stop: Callable[[], bool],
    ) -> None:
        self.forward = forward
        self.blocks = blocks
        self.adapters = adapters
        self.head = head
        self.options = options
        self.seed = seed
        self.should_stop = should_stop

    @property
    def loss_name(self) -> str:
        return "kl" if self.head is not None else "hidden-mse"

    def _final(self, batch: Batch) -> torch.Tensor:
        hidden = batch.embedded
        for index in range(self.blocks):
            # Recomputed in the backward pass: only each block's input is kept per batch.
            hidden = checkpoint(self.forward, index, hidden, batch.inputs[index], use_reentrant=False)
        return hidden

    def _loss(self, batch: Batch, train: bool, weight: float = 1.0) -> tuple[float, float]:
        """(summed loss, count) of one batch; with ``train`` the gradients of ``weight`` × the
        batch's mean loss are accumulated."""
        with torch.set_grad_enabled(train):
            final = self._final(batch)
        if self.head is None:
            mask = None if bool(batch.mask.all()) else batch.mask
            with torch.set_grad_enabled(train):
                diff, norm = relative_error(final, batch.teacher, mask)
                loss = diff / norm.clamp_min(1e-30)
            if train:
                (loss * weight).backward()
            return float(loss.detach()), 1.0
        # KL per piece of the head's output (logits are the largest tensors): the gradient
        # reaches the final hidden states through a detached leaf, then the blocks in one pass.
        leaf = final.detach().requires_grad_(train)
        total, count = 0.0, 0.0
        pieces = self.head(leaf, batch.teacher, batch.mask, train)
        tokens = sum(float(n) for _, n in pieces)
        for kl, n in pieces:
            if train:
                (kl * (weight / max(tokens, 1.0))).backward()
            total, count = total + float(kl.detach()), count + float(n)
        if train and leaf.grad is not None:
            final.backward(leaf.grad)
        return total, count

    def _heldout(self, batches: list[Batch]) -> float:
        total = count = 0.0
        for batch in batches:
            loss, n = self._loss(batch, train=False)
            total, count = total + loss, count + n
        return total / count if count else 0.0

    def run(self, train: list[Batch], heldout: list[Batch], sequences_per_batch: int) -> tuple[ModelRefinement, Adapters | None]:
        """``model_steps`` Adam steps, each on about ``model_batch_size`` sequences (whole
        batches of ``sequences_per_batch``); the adapters are returned when they lower the
        held-out loss."""
        started = time.perf_counter()
        per_step = max(1, min(len(train), round(self.options.model_batch_size / sequences_per_batch)))
        before = self._heldout(heldout)
        optimizer = relative_adam(self.adapters.parameters(), self.options.model_lr)
        generator = torch.Generator().manual_seed(self.seed)
        order: list[int] = []
        steps = self.options.model_steps
        done = 0
        for step in range(1, steps + 1):
            if self.should_stop():
                raise Cancelled("conversion cancelled")
            decay(optimizer, step, steps)
            optimizer.zero_grad(set_to_none=True)
            for _ in range(per_step):  # model_batch_size sequences: gradients of several batches
                if not order:
                    order = torch.randperm(len(train), generator=generator).tolist()
                self._loss(train[order.pop()], train=True, weight=1 / per_step)
            optimizer.step()
            done = step
        del optimizer
        after = self._heldout(heldout)
        accepted = after < before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = ModelRefinement(
            loss=self.loss_name,
            heldout_before=before,
            heldout_after=after,
            accepted=accepted,
            steps=done,
            seconds=time.perf_counter() - started,
            peak_memory_mb=peak,
        )
        return report, self.adapters.snapshot() if accepted else None


def kl_pieces(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows_per_piece: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A ``Head`` computing, per piece of ``rows_per_piece`` sequences, the summed KL(teacher ‖
    student) of the next-token distributions over real tokens, and the token count;
    ``logits_of(final hidden states, attention mask)`` is the model's own head."""

    def head(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, train: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pieces = []
        for start in range(0, student.shape[0], rows_per_piece):
            part = slice(start, start + rows_per_piece)
            with torch.no_grad():
                target = torch.log_softmax(logits_of(teacher[part], mask[part]).float(), dim=-1)
            with torch.set_grad_enabled(train):
                log_q = torch.log_softmax(logits_of(student[part], mask[part]).float(), dim=-1)
                kl = (target.exp() * (target - log_q)).sum(-1)
                weights = mask[part].to(kl.dtype)
                pieces.append(((kl * weights).sum(), weights.sum()))
        return pieces

    return head
