"""A per-layer picture of what LoftQ bought: plain quantization error vs. LoftQ error, layer by layer.

The plot is drawn from ``Report.to_dict()`` alone, so it can be (re)made from any
``loftq_report.json``. matplotlib is imported inside :func:`write_layer_plot`, so importing
``loftq`` (the job API does, for the options) stays light.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

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
_DPI = 110


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
    """Write a PNG of every layer's error before and after the adapters, in the objective's metric.

    x: layers in report order; series: plain quantization (``objective_error_quant``) and LoftQ
    (``objective_error``); with an activation objective also the weight error after LoftQ, faint,
    because the fit trades some of it for output error. Held-out evaluation numbers, when the
    report has them, go in a text box.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switching in workers

    layers = report.get("layers") or []
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

    # Faint separators between transformer blocks, where the report knows them.
    blocks = [layer.get("block") for layer in layers]
    for i in range(1, n):
        if blocks[i] is not None and blocks[i] != blocks[i - 1]:
            ax.axvline(i - 0.5, color="0.85", linewidth=0.6, zorder=0)

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
    ax.set_xlabel(f"layer ({n}, report order)")
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
    fig.savefig(path, format="png")
