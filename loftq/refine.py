"""Block-wise refinement: a first-order fit of one block's adapters to the full-precision block.

The closed-form fits (loftq/algorithm.py) minimise each layer's own error in the metric of its
own inputs; they cannot see how the errors of q, k, v, o, gate, up and down combine through
attention and the MLP's non-linearity. Refinement optimises every adapter of a block at once so
that the block, with Q as stored plus scaling·B·A, reproduces the full-precision model's output
at that block (the target the caller passes: docs/calibration.md "Refinement"). Q is never
touched, so the backbone stays exactly what the loader rebuilds.

The adapters are applied through forward hooks (output + scaling·(x·Aᵀ)·Bᵀ) on the block's own
modules, whose weights hold Q as loaded: the model's code runs unchanged, whatever the
architecture. Refinement starts from the closed-form adapters and keeps its best checkpoint
on sequences the steps never see; the caller keeps the closed form unless that checkpoint is
better (accept/reject per block).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from loftq.options import RefineOptions
from loftq.report import BlockRefinement

Adapters = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Target key -> (A r×in, B out×r), with the scaling folded in as the engine stores them."""

EVALUATIONS = 2
"""Held-out checkpoints during a block's steps (the best one is kept): half-way and at the end."""


@dataclass
class Batch:
    """One batch of a block's inputs and the output it should produce."""

    run: Callable[[], torch.Tensor]  # the block's output on this batch's inputs
    target: torch.Tensor
    mask: torch.Tensor | None  # B×L, 1 on real tokens; None when every token is real


def relative_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ‖out − target‖², Σ‖target‖²) over the real tokens: a ratio that does not depend on the
    hidden states' scale, so one learning rate suits every block."""
    diff = (out - target).square().sum(-1)
    norm = target.square().sum(-1)
    if mask is not None:
        weights = mask.to(diff.dtype)
        diff, norm = diff * weights, norm * weights
    return diff.sum(), norm.sum()


def balanced(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B·A split into factors of equal norm, as the closed form splits its SVD
    (loftq/algorithm.py ``_adapters``): QR of both factors and an r×r SVD."""
    q_b, r_b = torch.linalg.qr(lora_b)
    q_a, r_a = torch.linalg.qr(lora_a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    root = s.sqrt()
    return ((root[:, None] * vh) @ q_a.T).contiguous(), ((q_b @ u) * root).contiguous()


class BlockAdapters:
    """Trainable A and B of a block's targets, added to their modules' outputs by forward hooks."""

    def __init__(self, modules: dict[str, nn.Module], adapters: Adapters, scaling: float) -> None:
        self.scaling = scaling
        self.params = {
            key: (nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())) for key, (a, b) in adapters.items()
        }
        self._handles = [module.register_forward_hook(self._hook(key)) for key, module in modules.items()]

    def _hook(self, key: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            a, b = self.params[key]
            x = args[0]
            return output + self.scaling * nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b).to(output.dtype)

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.params.values() for p in pair]

    def snapshot(self) -> Adapters:
        return {key: (a.detach().clone(), b.detach().clone()) for key, (a, b) in self.params.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def relative_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam whose step size is ``lr`` times each tensor's RMS at the start: Adam moves every
    entry by about the learning rate, and adapter entries range over orders of magnitude between
    models and layers (they scale with the square root of the residual's singular values), so a
    relative rate is what one default can mean everywhere."""
    groups = []
    for param in params:
        rms = float(param.detach().square().mean().sqrt())
        groups.append({"params": [param], "lr": lr * rms if rms > 0 else lr, "base_lr": lr * rms if rms > 0 else lr})
    return torch.optim.Adam(groups)


def decay(optimizer: torch.optim.Optimizer, step: int, steps: int) -> None:
    """Cosine decay of every group's rate to a tenth over the steps (1-based ``step``)."""
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def _heldout_error(batches: Sequence[Batch]) -> float:
    with torch.no_grad():
        diff = norm = 0.0
        for batch in batches:
            d, n = relative_error(batch.run(), batch.target, batch.mask)
            diff, norm = diff + float(d), norm + float(n)
    return diff / norm if norm > 0 else 0.0


def refine_block(
    block: int,
    adapters: BlockAdapters,
    train: Sequence[Batch],
    heldout: Sequence[Batch],
    options: RefineOptions,
    seed: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[BlockRefinement, Adapters | None]:
    """Adam on the block's adapters; returns the report and the refined adapters when they beat
    the closed-form ones (the adapters' state at the call) on ``heldout``, else None.

    Batches are visited in a seeded random order, epoch after epoch; the learning rate decays
    along a cosine to a tenth. The held-out error is measured before the first step and at
    ``EVALUATIONS`` checkpoints; the best checkpoint is the candidate."""
    started = time.perf_counter()
    closed_form = _heldout_error(heldout)
    best_error, best = math.inf, None
    optimizer = relative_adam(adapters.parameters(), options.lr)
    steps = options.steps
    generator = torch.Generator().manual_seed(seed)
    checkpoints = {max(1, round(steps * k / EVALUATIONS)) for k in range(1, EVALUATIONS + 1)}
    order: list[int] = []
    train_losses: list[float] = []
    for step in range(1, steps + 1):
        if not order:
            order = torch.randperm(len(train), generator=generator).tolist()
        batch = train[order.pop()]
        decay(optimizer, step, steps)
        with torch.enable_grad():
            diff, norm = relative_error(batch.run(), batch.target, batch.mask)
            loss = diff / norm.clamp_min(1e-30)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        train_losses.append(float(loss.detach()))
        if step in checkpoints:
            if should_stop():
                break
            error = _heldout_error(heldout)
            if error < best_error:
                best_error, best = error, adapters.snapshot()
    del optimizer
    accepted = best is not None and best_error < closed_form
    first = train_losses[: max(1, len(train))]
    last = train_losses[-max(1, len(train)) :]
    report = BlockRefinement(
        block=block,
        accepted=accepted,
        heldout_closed_form=closed_form,
        heldout_refined=best_error if best is not None else closed_form,
        train_first=sum(first) / len(first),
        train_last=sum(last) / len(last),
        steps=len(train_losses),
        seconds=time.perf_counter() - started,
    )
    if not accepted or best is None:
        return report, None
    return report, {key: balanced(a, b) for key, (a, b) in best.items()}
