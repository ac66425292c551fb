"""The per-layer PNG: drawn from a report dict alone, with matplotlib loaded only when drawing."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loftq.options import ConvertOptions
from loftq.plot import PLOT_NAME, block_of, block_spans, layer_figure, metric_label, model_order, short_name, short_names, write_layer_plot
from loftq.report import Evaluation, LayerReport, Report, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_report(layers: int, objective: str = "weight", evaluation: Evaluation | None = None) -> dict[str, Any]:
    """A ``Report.to_dict()`` as a conversion of a ``layers // 7``-block Llama would produce it."""
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    reports = []
    for i in range(layers):
        block, leaf = divmod(i, len(leaves))
        error_quant = 0.10 + 0.01 * (i % 5)
        reports.append(
            LayerReport(
                module=f"model.layers.{block}.{'self_attn' if leaf < 4 else 'mlp'}.{leaves[leaf]}",
                key=f"model.layers.{block}.{leaves[leaf]}.weight",
                shard="model.safetensors",
                shape=(64, 64),
                fan_in_fan_out=False,
                error_quant=error_quant,
                error=0.7 * error_quant,
                iter_errors=[0.4 * error_quant],
                best_iter=1,
                seconds=0.01,
                objective=objective,
                **({"objective_error_quant": 1.2 * error_quant, "objective_error": 0.4 * error_quant, "block": block} if objective != "weight" else {}),
            )
        )
    summary = summarize(reports, seconds=1.0, peak_rss_mb=100.0, peak_device_mb=None, shards=1, shards_resumed=0, evaluation=evaluation)
    return Report(
        format_version=1,
        source="tiny",
        architecture="LlamaForCausalLM",
        options=ConvertOptions(objective=objective).model_dump(),
        scaling=1.0,
        device="cpu",
        versions={},
        summary=summary,
        layers=reports,
    ).to_dict()


EVALUATION = Evaluation(
    sequences=16,
    tokens=8192,
    cosine_quantized=0.981,
    cosine_initialised=0.993,
    perplexity_full_precision=12.3,
    perplexity_quantized=14.1,
    perplexity_initialised=12.9,
    gap_recovered=0.667,
)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_name_is_what_the_converter_writes() -> None:
    assert PLOT_NAME == "loftq_layers.png"


@pytest.mark.parametrize(
    ("layers", "objective", "evaluation"),
    [(12, "weight", None), (12, "activation", EVALUATION), (0, "weight", None), (35, "activation-diag", Evaluation(4, 512, 0.97, 0.99, gap_recovered=0.5))],
)
def test_writes_a_png(tmp_path: Path, layers: int, objective: str, evaluation: Evaluation | None) -> None:
    path = tmp_path / PLOT_NAME
    write_layer_plot(synthetic_report(layers, objective, evaluation), path)
    width, height = png_size(path)
    assert width > 0 and height > 0


def test_width_grows_with_layers_and_is_capped(tmp_path: Path) -> None:
    sizes = {}
    for layers in (7, 210, 2000):
        path = tmp_path / f"{layers}.png"
        write_layer_plot(synthetic_report(layers, "activation", EVALUATION), path)
        sizes[layers] = png_size(path)
    assert sizes[7][0] < sizes[210][0] <= sizes[2000][0]
    assert sizes[2000][0] <= 32 * 110 + 1  # width capped at 32 in at 110 dpi
    assert sizes[7][1] == sizes[2000][1]


def test_reads_a_report_from_before_the_objective_fields(tmp_path: Path) -> None:
    report = synthetic_report(5)
    for layer in report["layers"]:
        for key in ("objective", "objective_error_quant", "objective_error", "block", "warnings"):
            del layer[key]
    for key in ("objective", "mean_objective_error_quant", "mean_objective_error", "evaluation"):
        del report["summary"][key]
    write_layer_plot(report, tmp_path / PLOT_NAME)
    png_size(tmp_path / PLOT_NAME)


def test_labels() -> None:
    assert short_name("model.layers.12.self_attn.q_proj") == "12.q_proj"
    assert short_name("encoder.layer.0.attention.self.query") == "0.query"
    assert short_name("transformer.h.3.mlp.c_fc") == "3.c_fc"
    assert short_name("lm_head") == "lm_head"
    assert short_name("pooler.dense") == "pooler.dense"
    assert short_name("encoder.layer.0.attention.output.dense", depth=2) == "0.output.dense"
    assert short_name("encoder.layer.0.attention.output.dense", depth=9) == "0.attention.output.dense"
    bert = ["encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", "pooler.dense"]
    assert short_names(bert) == ["0.attention.output.dense", "0.query", "0.intermediate.dense", "0.output.dense", "pooler.dense"]
    assert short_names(["a.b", "a.b"]) == ["a.b", "a.b"]  # identical names cannot be told apart: no endless loop
    assert "‖W−·‖/‖W‖" in metric_label("weight")
    assert "H^½" in metric_label("activation") and "H^½" in metric_label("activation-diag")


def text_sorted(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its layers in text order, as a checkpoint's file lists them ("layers.10" before "layers.2"),
    plus an embedding-side projection and a head, which lie outside the blocks."""
    outer = [dict(report["layers"][0], module=name, block=None) for name in ("lm_head", "model.embed_proj")]
    return {**report, "layers": sorted(report["layers"] + outer, key=lambda layer: layer["module"])}


@pytest.mark.parametrize("objective", ["weight", "activation"])  # block from the name / from the report's field
def test_model_order_of_12_blocks_is_numeric(objective: str) -> None:
    model = synthetic_report(12 * 7, objective)
    report = text_sorted(model)
    modules = [layer["module"] for layer in report["layers"]]
    assert modules.index("model.layers.10.mlp.down_proj") < modules.index("model.layers.2.mlp.down_proj")  # file order
    ordered = [report["layers"][i] for i in model_order(report["layers"])]
    blocks = [block_of(layer) for layer in ordered]
    assert ordered[0]["module"] == "model.embed_proj" and ordered[-1]["module"] == "lm_head"
    assert blocks[0] is None and blocks[-1] is None
    assert [block for _, block in blocks[1:-1]] == [block for block in range(12) for _ in range(7)]
    # Within a block, the report's order (here the file's: mlp.down_proj, mlp.gate_proj, ...).
    in_block_3 = [layer["module"].split(".", 3)[-1] for layer in ordered if block_of(layer) == ("model.layers", 3)]
    assert in_block_3 == sorted(in_block_3)
    assert block_spans(ordered) == [(1 + 7 * block, 8 + 7 * block, block) for block in range(12)]


def test_block_of_prefers_the_report_field_and_keeps_stacks_apart() -> None:
    assert block_of({"module": "model.layers.12.mlp.experts.3.down_proj"}) == ("model.layers", 12)
    assert block_of({"module": "encoder.layer.2.attention.self.query", "block": 7}) == ("encoder.layer", 7)
    assert block_of({"module": "pooler.dense"}) is None and block_of({"module": "pooler.dense", "block": None}) is None
    layers = [{"module": name} for name in ("vision.blocks.1.fc", "text.layers.0.q", "vision.blocks.0.fc", "text.layers.1.q")]
    assert [layers[i]["module"] for i in model_order(layers)] == ["vision.blocks.0.fc", "vision.blocks.1.fc", "text.layers.0.q", "text.layers.1.q"]
    ordered = [layers[i] for i in model_order(layers)]
    assert block_spans(ordered) == [(0, 1, 0), (1, 2, 1), (2, 3, 0), (3, 4, 1)]  # same number, different stacks: two blocks
    assert model_order([]) == [] and block_spans([]) == []


def test_plot_draws_layers_in_model_order_with_numbered_blocks(tmp_path: Path) -> None:
    report = text_sorted(synthetic_report(12 * 7, "activation", EVALUATION))
    figure = layer_figure(report)
    ax = figure.axes[0]
    labels = [label.get_text() for label in ax.get_xticklabels()]
    numbered = [label.split(".")[0] for label in labels if label[:1].isdigit()]
    assert numbered == sorted(numbered, key=int) and numbered[-1] == "11"
    (block_axis,) = ax.child_axes  # block numbers on the top axis
    assert [label.get_text() for label in block_axis.get_xticklabels()] == [str(block) for block in range(12)]
    shaded = [patch for patch in ax.patches if patch.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
    assert len(shaded) == 6  # every other block
    boundaries = sorted(line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1)
    assert boundaries == [1 + 7 * block - 0.5 for block in range(13)]  # also after the embedding side and before the head
    write_layer_plot(report, tmp_path / PLOT_NAME)
    width, height = png_size(tmp_path / PLOT_NAME)
    assert width > 0 and height > 0


def test_importing_loftq_does_not_load_matplotlib() -> None:
    code = "import sys, loftq, loftq.plot, loftq.cli, loftq.report, loftq.options; print([m for m in sys.modules if m.split('.')[0] == 'matplotlib'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
