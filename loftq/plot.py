"""A per-layer picture of what LoftQ bought: plain quantization error vs. LoftQ error, layer by layer.

The plot is drawn from ``Report.to_dict()`` alone, so it can be (re)made from any
``loftq_report.json``. matplotlib is imported inside :func:`layer_figure`, so importing
``loftq`` (the job API does, for the options) stays light.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_NAME = "loftq_layers.png"

_WEIGHT_METRIC = "relative error ‖W−·‖/‖W‖"
_OUTPUT_METRIC = "relative output error ‖(W−·)·H^½‖/‖W·H^½‖"
METRIC_LABELS = {
    "weight": _WEIGHT_METRIC,
    "activation": _OUTPUT_METRIC,
    "activation-diag": _OUTPUT_METRIC + "  (H: diagonal)",
}

_MIN_WIDTH_IN, _MAX_WIDTH_IN, _INCH_PER_LAYER = 8.0, 32.0, 0.12
_LABELS_PER_INCH = 6  # rotated 6-pt labels stay legible at about this density
_BLOCK_LABELS_PER_INCH = 4  # upright block numbers on the top axis
_DPI = 110

# Targets outside the blocks that the model runs before them (embedding projections); every other
# one (pooler, classifier, LM head) runs after the last block.
_BEFORE_BLOCKS = re.compile(r"embed|wte|wpe|project_in|patch", re.IGNORECASE)


def metric_label(objective: str) -> str:
    """The y-axis label for ``objective``'s metric ("mixed" when layers used different objectives)."""
    return METRIC_LABELS.get(objective, "relative error in each layer's objective metric")


def short_name(module: str, depth: int = 1) -> str:
    """``model.layers.12.self_attn.q_proj`` -> ``12.q_proj``: block number and the last ``depth`` parts, enough to read an axis."""
    parts = module.split(".")
    numeric = [i for i, part in enumerate(parts) if re.fullmatch(r"\d+", part)]
    if numeric and numeric[-1] < len(parts) - 1:
        block = numeric[-1]
        return ".".join([parts[block], *parts[max(block + 1, len(parts) - depth) :]])
    return ".".join(parts[-1 - depth :])


def short_names(modules: list[str]) -> list[str]:
    """:func:`short_name` of each module, lengthened where two would read the same (BERT's three ``N.dense``)."""
    depths = [1] * len(modules)
    while True:
        names = [short_name(module, depth) for module, depth in zip(modules, depths)]
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name, []).append(i)
        grown = False
        for indices in seen.values():
            if len(indices) > 1:
                for i in indices:
                    if short_name(modules[i], depths[i] + 1) != names[i]:
                        depths[i] += 1
                        grown = True
        if not grown:
            return names


def block_of(layer: dict[str, Any]) -> tuple[str, int] | None:
    """``(stack, block)`` of a report layer, None outside the transformer blocks.

    The block is the report's ``block`` when it has one, else the module name's first numeric path
    component (``model.layers.12.mlp.down_proj`` -> 12); the stack is the path before that component
    (``model.layers``), so a model with two stacks of blocks does not interleave them.
    """
    parts = str(layer.get("module", "")).split(".")
    index = next((i for i, part in enumerate(parts) if part.isascii() and part.isdigit()), None)
    block = layer.get("block")
    if block is None and index is not None:
        block = int(parts[index])
    if block is None:
        return None
    return (".".join(parts[:index]) if index is not None else "", int(block))


def model_order(layers: list[dict[str, Any]]) -> list[int]:
    """Indices of ``layers`` (report dicts) in the order the model runs them.

    Reports written since format 3 list layers in the model's module order already; older ones
    (and hand-made ones) in checkpoint-file order, where ``layers.10`` sorts before ``layers.2``.
    Here blocks go by number (0, 1, 2, ..., 10, 11), modules within a block keep the report's
    order, layers outside blocks go first if they are embedding-side and last otherwise (the
    head). The CLI's per-layer table uses the same order as the plot.
    """
    keys = [block_of(layer) for layer in layers]
    stacks = {stack: rank for rank, stack in enumerate(dict.fromkeys(key[0] for key in keys if key is not None))}

    def position(i: int) -> tuple[int, int, int, int]:
        key = keys[i]
        if key is None:
            return (0 if _BEFORE_BLOCKS.search(str(layers[i].get("module", ""))) else 2, 0, 0, i)
        return (1, stacks[key[0]], key[1], i)

    return sorted(range(len(layers)), key=position)


def block_spans(layers: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """``(first, past_last, block)``: the runs of consecutive positions in ``layers`` (pass them in
    :func:`model_order`) that belong to one block; layers outside blocks are in no span."""
    spans: list[tuple[int, int, int]] = []
    previous: tuple[str, int] | None = None
    for i, layer in enumerate(layers):
        key = block_of(layer)
        if key is not None and key == previous:
            spans[-1] = (spans[-1][0], i + 1, key[1])
        elif key is not None:
            spans.append((i, i + 1, key[1]))
        previous = key
    return spans


def _number(value: Any) -> float:
    """JSON reports may hold null (or NaN) for a value the run could not measure; plot those as gaps."""
    return math.nan if value is None else float(value)


def _evaluation_text(evaluation: dict[str, Any]) -> str:
    lines = [f"held-out: {evaluation['sequences']} sequences, {evaluation['tokens']} tokens"]
    if evaluation.get("perplexity_full_precision") is not None:
        lines.append(
            "perplexity: full precision {:.3f} / quantized {:.3f} / initialised {:.3f}".format(
                evaluation["perplexity_full_precision"], evaluation["perplexity_quantized"], evaluation["perplexity_initialised"]
            )
        )
    lines.append(f"cosine to full precision: quantized {evaluation['cosine_quantized']:.4f} / initialised {evaluation['cosine_initialised']:.4f}")
    if evaluation.get("gap_recovered") is not None:
        basis = "perplexity" if evaluation.get("perplexity_full_precision") is not None else "1 − cosine"
        lines.append(f"gap recovered ({basis}): {100 * evaluation['gap_recovered']:.1f} %")
    return "\n".join(lines)


def write_layer_plot(report: dict[str, Any], path: Path | str) -> None:
    """Write :func:`layer_figure` of ``report`` as a PNG."""
    layer_figure(report).savefig(path, format="png")


def layer_figure(report: dict[str, Any]) -> Figure:
    """Every layer's error before and after the adapters, in the objective's metric.

    x: layers in the model's order (:func:`model_order`), blocks in alternating bands numbered on
    the top axis; series: plain quantization (``objective_error_quant``) and LoftQ
    (``objective_error``); with an activation objective also the weight error after LoftQ, faint,
    because the fit trades some of it for output error. Held-out evaluation numbers, when the
    report has them, go in a text box.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switching in workers

    layers = report.get("layers") or []
    layers = [layers[i] for i in model_order(layers)]
    summary = report.get("summary") or {}
    options = report.get("options") or {}
    objective = summary.get("objective") or options.get("objective") or "weight"
    n = len(layers)

    width = min(_MAX_WIDTH_IN, max(_MIN_WIDTH_IN, 2.0 + _INCH_PER_LAYER * n))
    fig = Figure(figsize=(width, 5.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()

    xs = list(range(n))
    quant = [_number(layer.get("objective_error_quant", layer.get("error_quant"))) for layer in layers]
    loftq = [_number(layer.get("objective_error", layer.get("error"))) for layer in layers]
    marker = "o" if n <= 60 else None
    ax.plot(xs, quant, color="tab:red", marker=marker, markersize=3, linewidth=1.2, label="plain quantization")
    ax.plot(xs, loftq, color="tab:blue", marker=marker, markersize=3, linewidth=1.2, label="LoftQ")
    plotted = quant + loftq
    if objective != "weight":
        weight_after = [_number(layer.get("error")) for layer in layers]
        ax.plot(xs, weight_after, color="tab:blue", alpha=0.35, linestyle="--", linewidth=1.0, label="LoftQ, weight error ‖W−·‖/‖W‖")
        plotted += weight_after

    # Transformer blocks: every other one shaded, a faint line at each boundary, numbers on top.
    spans = block_spans(layers)
    for k, (first, past_last, _) in enumerate(spans):
        if k % 2:
            ax.axvspan(first - 0.5, past_last - 0.5, color="0.95", linewidth=0, zorder=0)
    for boundary in sorted({edge for first, past_last, _ in spans for edge in (first, past_last)} - {0, n}):
        ax.axvline(boundary - 0.5, color="0.8", linewidth=0.6, zorder=0)
    if spans:
        step = math.ceil(len(spans) / max(1, int(width * _BLOCK_LABELS_PER_INCH)))
        block_axis = ax.secondary_xaxis("top")
        block_axis.set_xticks([(first + past_last - 1) / 2 for first, past_last, _ in spans[::step]])
        block_axis.set_xticklabels([str(block) for _, _, block in spans[::step]], fontsize=7)
        block_axis.tick_params(length=0)
        block_axis.set_xlabel("block", fontsize=8)

    if n:
        max_labels = max(1, int(width * _LABELS_PER_INCH))
        step = math.ceil(n / max_labels)
        ticks = xs[::step]
        ax.set_xticks(ticks)
        labels = short_names([layer["module"] for layer in layers])
        ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=6)
        ax.set_xlim(-0.5, n - 0.5)
    else:
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no layers", transform=ax.transAxes, ha="center", va="center", color="0.5")
    # Headroom above the data for the legend (upper left) and the evaluation box (upper right).
    finite = [v for v in plotted if math.isfinite(v)]
    evaluation = summary.get("evaluation")
    top = max(finite, default=1.0) * (1.45 if evaluation else 1.25)
    ax.set_ylim(0, top if top > 0 else 1.0)
    ax.set_xlabel(f"layer ({n}, model order)")
    ax.set_ylabel(metric_label(objective))
    ax.grid(axis="y", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)

    bits = options.get("bits")
    quant_name = f"{options.get('quant', '?')}" + (f" {bits}-bit" if bits is not None else "")
    ax.set_title(
        f"{report.get('architecture', '?')}: {quant_name}, r={options.get('rank', '?')}, "
        f"T={options.get('iters', '?')}, objective {objective}",
        fontsize=11,
    )
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)

    if evaluation:
        ax.text(
            0.99,
            0.98,
            _evaluation_text(evaluation),
            transform=ax.transAxes,
            ha="right",
            va="top",
            multialignment="left",
            fontsize=8,
            family="monospace",
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9},
        )
    return fig
