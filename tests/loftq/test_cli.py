"""The ``loftq`` command line, run as users run it: a real subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from loftq import cli
from loftq.errors import InvalidCalibrationData, InvalidOptions
from loftq.options import CalibrationOptions, ConvertOptions, RefineOptions
from loftq.report import BlockRefinement, Calibration, Evaluation, LayerReport, ModelRefinement, Refinement, Report, summarize


def loftq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loftq.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )


def test_help_explains_every_option() -> None:
    result = loftq("convert", "--help")
    assert result.returncode == 0
    for option in ("--quant", "--bits", "--rank", "--alpha", "--iters", "--svd", "--target", "--target-regex", "--backbone-format", "--device"):
        assert option in result.stdout


def test_convert_then_inspect(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = loftq("convert", str(tiny_bert), str(out), "--rank", "8", "--alpha", "32", "--iters", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "mean error, with adapters" in result.stdout
    report = json.loads((out / "loftq_report.json").read_text())
    assert report["options"]["rank"] == 8 and report["options"]["lora_alpha"] == 32.0
    assert f"{report['summary']['mean_error']:.5f}" in result.stdout

    inspected = loftq("inspect", str(out), "--layers", "--verify")
    assert inspected.returncode == 0, inspected.stderr
    assert "all files match manifest.json" in inspected.stdout
    assert "encoder.layer.0.attention.self.query" in inspected.stdout

    (out / "model.safetensors").write_bytes(b"tampered")
    tampered = loftq("inspect", str(out), "--verify")
    assert tampered.returncode == 2
    assert "checksum_mismatch" in tampered.stderr and "model.safetensors" in tampered.stderr


def test_targets_by_name(tiny_llama: Path, tmp_path: Path) -> None:
    result = loftq("convert", str(tiny_llama), str(tmp_path), "-r", "4", "--target", "q_proj", "--target", "v_proj")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "loftq_init" / "adapter_config.json").read_text())
    assert config["target_modules"] and all(m.endswith(("q_proj", "v_proj")) for m in config["target_modules"])


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--rank", "0"], "invalid_options"),
        (["--quant", "nf4", "--bits", "3"], "invalid_options"),
        (["--quant", "int", "--bits", "9"], "invalid_options"),
        (["--target", "nope"], "no_target_modules"),
        (["--target-regex", "(unclosed"], "invalid_options"),
        (["--rank", "4096"], "invalid_options"),
    ],
)
def test_bad_options_exit_2_with_a_code(tiny_bert: Path, tmp_path: Path, args: list[str], code: str) -> None:
    result = loftq("convert", str(tiny_bert), str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert f"[{code}]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_source_and_incomplete_output(tmp_path: Path) -> None:
    missing = loftq("convert", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert missing.returncode == 2 and "[source_not_found]" in missing.stderr
    incomplete = loftq("inspect", str(tmp_path))
    assert incomplete.returncode == 2 and "[incomplete_checkpoint]" in incomplete.stderr


# --- calibrated conversions: flags, fail-fast checks and the closing table (no conversion needed) ---


def calibrated_report(
    evaluation: Evaluation | None, objective: str = "activation", output_errors: bool = True, refinement: Refinement | None = None
) -> dict[str, Any]:
    """A ``Report.to_dict()`` shaped like a calibrated conversion's, built from the real dataclasses."""
    layers = [
        LayerReport(
            module=f"model.layers.{block}.self_attn.{leaf}",
            key=f"model.layers.{block}.self_attn.{leaf}.weight",
            shard="model.safetensors",
            shape=(64, 32),
            fan_in_fan_out=False,
            error_quant=0.1,
            error=0.08,
            iter_errors=[0.03],
            best_iter=1,
            seconds=0.5,
            objective=objective,
            **({} if objective == "weight" else {"objective_error_quant": 0.11 if objective == "activation-diag" else 0.12, "objective_error": 0.04 if objective == "activation-diag" else 0.03}),
            block=block,
            warnings=["H is rank-deficient: 3 of 32 input directions unseen"] if (block, leaf) == (1, "v_proj") else [],
        )
        for block in range(2)
        for leaf in ("q_proj", "v_proj")
    ]
    summary = summarize(layers, seconds=3.0, peak_rss_mb=512.0, peak_device_mb=None, shards=1, shards_resumed=0, evaluation=evaluation)
    calibration = Calibration(sha256="ab" * 32, documents=40, sequences=8, tokens=1024, seq_len=128, packed=True, propagation="initialised", blocks=2)
    report = Report(
        format_version=2,
        source="tiny",
        architecture="LlamaForCausalLM",
        options=ConvertOptions(objective=objective).model_dump(),
        scaling=1.0,
        device="cpu",
        versions={},
        summary=summary,
        layers=layers,
        calibration=calibration,
        refinement=refinement,
    ).to_dict()
    if output_errors:  # measured with the full H whatever the objective (set as dict keys: older LayerReports lack them)
        for layer in report["layers"]:
            layer["output_error_quant"], layer["output_error"] = 0.12, 0.03 if objective != "weight" else 0.09
    return report


def render(report: dict[str, Any], out: Path) -> str:
    buffer = io.StringIO()
    cli._print_summary(report, out, Console(file=buffer, width=220))
    return buffer.getvalue()


def test_help_lists_the_calibration_flags() -> None:
    result = loftq("convert", "--help")
    assert result.returncode == 0
    for option in ("--calibration-data", "--objective", "--damping", "--calib-samples", "--calib-seq-len", "--eval-samples", "--calib-seed", "--calib-batch-size", "--propagation", "--evaluate", "--no-evaluate"):
        assert option in result.stdout
    for option in ("--refine", "--refine-steps", "--refine-lr", "--refine-batch-size", "--refine-holdout", "--model-refine-steps", "--model-refine-lr", "--model-refine-batch-size"):
        assert option in result.stdout


def test_unset_flags_keep_the_model_defaults() -> None:
    assert cli._options_from_flags() == ConvertOptions()
    assert cli._options_from_flags(quant="int8") == ConvertOptions(quant="int8", bits=8)
    options = cli._options_from_flags(rank=8, objective="activation-diag", damping=0.1, calib_samples=32, calib_seed=3, evaluate=True)
    assert options.objective == "activation-diag" and options.damping == 0.1 and options.rank == 8
    assert options.calibration == CalibrationOptions(samples=32, seed=3, evaluate=True)
    every = cli._options_from_flags(calib_samples=4, calib_seq_len=64, eval_samples=0, calib_seed=7, calib_batch_size=2, propagation="full-precision", evaluate=False)
    assert every.calibration == CalibrationOptions(samples=4, seq_len=64, eval_samples=0, seed=7, batch_size=2, propagation="full-precision", evaluate=False)


def test_refine_flags_map_to_the_options() -> None:
    options = cli._options_from_flags(refine="block+model", refine_steps=7, refine_lr=0.01, refine_batch_size=2, refine_holdout=0.25,
                                      model_refine_steps=3, model_refine_lr=1e-5, model_refine_batch_size=1, calib_samples=16)
    assert options.refine == "block+model" and options.refines_blocks and options.refines_model
    assert options.refinement == RefineOptions(steps=7, lr=0.01, batch_size=2, holdout=0.25, model_steps=3, model_lr=1e-5, model_batch_size=1)
    assert options.calibration == CalibrationOptions(samples=16)
    some = cli._options_from_flags(refine="block", refine_steps=5)
    assert some.refinement == RefineOptions(steps=5) and some.refine == "block"  # flags left out keep the defaults
    assert cli._options_from_flags(model_refine_steps=2).refine == "none"  # settings alone do not switch refinement on
    with pytest.raises(InvalidOptions, match=r"refine \(--refine\).*refinement\.holdout \(--refine-holdout\).*refinement\.model_lr \(--model-refine-lr\)"):
        cli._options_from_flags(refine="bogus", refine_holdout=1.5, model_refine_lr=0.0)
    with pytest.raises(TypeError, match="unknown flags"):
        cli._options_from_flags(refine_epochs=3)


def test_bad_calibration_flags_name_the_flag() -> None:
    with pytest.raises(InvalidOptions, match=r"calibration\.samples \(--calib-samples\).*calibration\.propagation \(--propagation\)"):
        cli._options_from_flags(calib_samples=0, propagation="sideways")
    with pytest.raises(InvalidOptions, match=r"objective \(--objective\)"):
        cli._options_from_flags(objective="loss")
    with pytest.raises(InvalidOptions, match=r"damping \(--damping\)"):
        cli._options_from_flags(damping=-1.0)
    with pytest.raises(InvalidOptions, match="not both"):
        cli._options_from_flags(target=["q_proj"], target_regex=".*")


def test_calibration_data_checks(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    with pytest.raises(InvalidOptions, match="--calibration-data"):
        cli._check_calibration_data(None, ConvertOptions(objective="activation"))
    with pytest.raises(InvalidOptions, match="--calibration-data"):
        cli._check_calibration_data(None, ConvertOptions(calibration=CalibrationOptions(evaluate=True)))
    with pytest.raises(InvalidCalibrationData, match="no such file"):
        cli._check_calibration_data(tmp_path / "missing.txt", ConvertOptions(objective="activation"))
    assert cli._check_calibration_data(None, ConvertOptions()) is None
    assert cli._check_calibration_data(text, ConvertOptions(objective="activation")) is None
    assert cli._check_calibration_data(tmp_path, ConvertOptions(calibration=CalibrationOptions(evaluate=True))) is None
    assert "does not change the fit" in (cli._check_calibration_data(text, ConvertOptions()) or "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (ConvertOptions(refine="block"), "--refine block refines the adapters on calibration text: give --calibration-data PATH"),
        (ConvertOptions(refine="block+model"), "--refine block+model "),
        (ConvertOptions(objective="activation-diag"), "--objective activation-diag fits each layer"),
        (ConvertOptions(calibration=CalibrationOptions(evaluate=True)), "--evaluate measures"),
    ],
)
def test_missing_calibration_data_names_the_flag_that_needs_it(options: ConvertOptions, message: str) -> None:
    """The refusal is ``options.calibration_need`` in flags, so the user sees which flag asked for the text."""
    with pytest.raises(InvalidOptions) as info:
        cli._check_calibration_data(None, options)
    assert message in str(info.value) and str(info.value).endswith("give --calibration-data PATH")


def test_refine_with_calibration_data_gets_no_note(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    assert cli._check_calibration_data(text, ConvertOptions(refine="model")) is None


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--calibration-data", "MISSING", "--objective", "activation"], "invalid_calibration_data", "no such file or directory"),
        (["--objective", "activation"], "invalid_options", "give --calibration-data"),
        (["--evaluate"], "invalid_options", "give --calibration-data"),
        (["--refine", "block", "--refine-steps", "5"], "invalid_options", "--refine block refines the adapters on calibration text: give --calibration-data"),
        (["--refine", "sideways"], "invalid_options", "refine (--refine)"),
        (["--calib-seq-len", "4"], "invalid_options", "--calib-seq-len"),
    ],
)
def test_calibration_flags_fail_fast(tmp_path: Path, args: list[str], code: str, message: str) -> None:
    """Checked before the checkpoint is read (the source here does not even exist) and before torch loads."""
    args = [str(tmp_path / "missing.txt") if arg == "MISSING" else arg for arg in args]
    result = loftq("convert", str(tmp_path / "no-source"), str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert f"[{code}]" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_summary_shows_objective_and_evaluation(tmp_path: Path) -> None:
    report = calibrated_report(
        Evaluation(
            sequences=16,
            tokens=2048,
            cosine_quantized=0.97125,
            cosine_initialised=0.99342,
            perplexity_full_precision=12.3456,
            perplexity_quantized=14.5678,
            perplexity_initialised=12.9876,
            gap_recovered=0.711,
        )
    )
    (tmp_path / "loftq_layers.png").write_bytes(b"")
    text = render(report, tmp_path)
    assert "mean error, quantized only" in text and "0.10000" in text
    assert "mean error, with adapters" in text and "0.08000" in text
    assert "mean output error (activation), quantized only" in text and "0.12000" in text
    assert "mean output error (activation), with adapters" in text and "0.03000" in text
    assert "objective=activation" in text
    assert "8 sequences × 128 tokens" in text and "propagation initialised" in text
    for label, value in [
        ("held-out perplexity, full precision", "12.3456"),
        ("held-out perplexity, quantized only", "14.5678"),
        ("held-out perplexity, with adapters", "12.9876"),
        ("gap recovered by the adapters", "71.1 % (of the perplexity gap)"),
        ("mean cosine to full precision, quantized only", "0.97125"),
        ("mean cosine to full precision, with adapters", "0.99342"),
    ]:
        line = next(line for line in text.splitlines() if label in line)
        assert value in line, line
    assert "layers with warnings" in text
    assert "loftq_layers.png" in text


def test_summary_of_an_encoder_without_perplexity(tmp_path: Path) -> None:
    text = render(calibrated_report(Evaluation(sequences=4, tokens=256, cosine_quantized=0.9, cosine_initialised=0.95, gap_recovered=0.5)), tmp_path)
    assert "perplexity" not in text
    assert "50.0 % (of the 1 − cosine gap)" in text
    assert "mean cosine to full precision, with adapters" in text


def test_weight_summary_has_no_objective_rows(tmp_path: Path) -> None:
    report = calibrated_report(None, objective="weight", output_errors=False)
    del report["calibration"]
    text = render(report, tmp_path)
    assert "mean error, with adapters" in text
    assert "output error" not in text and "held-out" not in text and "objective=" not in text
    assert "layer plot" not in text  # no loftq_layers.png in tmp_path


def test_weight_objective_with_calibration_shows_the_measured_output_error(tmp_path: Path) -> None:
    text = render(calibrated_report(None, objective="weight"), tmp_path)
    line = next(line for line in text.splitlines() if "mean output error (measured), with adapters" in line)
    assert "0.09000" in line
    assert "objective=" not in text


def test_activation_diag_shows_its_metric_and_the_full_output_error(tmp_path: Path) -> None:
    report = calibrated_report(None, objective="activation-diag")
    report["warnings"] = ["calibration text gave 6 of the 8 requested sequences"]
    text = render(report, tmp_path)
    assert "0.11000" in next(line for line in text.splitlines() if "mean activation-diag error, quantized only" in line)
    assert "0.04000" in next(line for line in text.splitlines() if "mean activation-diag error, with adapters" in line)
    assert "0.03000" in next(line for line in text.splitlines() if "mean output error (activation-diag), with adapters" in line)
    assert "6 of the 8 requested sequences" in text


def test_summary_reads_a_report_from_before_calibration(tmp_path: Path) -> None:
    report = calibrated_report(None, objective="weight", output_errors=False)
    del report["calibration"]
    for key in ("objective", "mean_objective_error_quant", "mean_objective_error", "evaluation"):
        del report["summary"][key]
    for key in ("objective", "damping", "calibration"):
        del report["options"][key]
    assert "mean error, with adapters" in render(report, tmp_path)


def test_layers_table_adds_objective_columns_only_when_relevant() -> None:
    def rendered(report: dict[str, Any]) -> str:
        buffer = io.StringIO()
        Console(file=buffer, width=300).print(cli._layers_table(report["layers"]))
        return buffer.getvalue()

    calibrated = rendered(calibrated_report(None))
    assert "output err, quantized" in calibrated and "output err, with adapters" in calibrated and "block" in calibrated
    assert "0.12000" in calibrated and "0.03000" in calibrated
    assert "diag-H" not in calibrated
    assert "rank-deficient" in calibrated
    without_output_fields = calibrated_report(None, output_errors=False)  # activation: the objective metric is the output error
    assert "output err, with adapters" in rendered(without_output_fields) and "0.03000" in rendered(without_output_fields)
    diag = rendered(calibrated_report(None, objective="activation-diag"))
    assert "diag-H err, quantized" in diag and "0.11000" in diag and "output err, quantized" in diag
    plain = calibrated_report(None, objective="weight", output_errors=False)
    for layer in plain["layers"]:
        layer["block"], layer["warnings"] = None, []
    text = rendered(plain)
    assert "output err" not in text and "diag-H" not in text and "block" not in text and "warnings" not in text


REFINEMENT = Refinement(
    mode="block+model",
    blocks=[
        BlockRefinement(block=0, accepted=True, heldout_closed_form=0.02, heldout_refined=0.015, train_first=0.03, train_last=0.01, steps=100, seconds=1.5),
        BlockRefinement(block=1, accepted=False, heldout_closed_form=0.02, heldout_refined=0.021, train_first=0.03, train_last=0.02, steps=100, seconds=1.5),
    ],
    model=ModelRefinement(loss="kl", heldout_before=0.0421, heldout_after=0.0312, accepted=True, steps=20, seconds=4.25, peak_memory_mb=300.0),
    heldout_sequences=2,
    seconds=7.25,
)


def test_summary_shows_the_refinement(tmp_path: Path) -> None:
    report = calibrated_report(None, refinement=REFINEMENT)
    report["options"]["refine"] = "block+model"
    text = render(report, tmp_path)
    assert "refine=block+model" in next(line for line in text.splitlines() if "settings" in line)
    line = next(line for line in text.splitlines() if "│ refinement" in line)
    for part in ("block+model: 1/2 blocks accepted", "mean held-out gain 12.5 %", "7.2 s", "2 held-out sequences"):
        assert part in line, line
    line = next(line for line in text.splitlines() if "model refinement" in line)
    assert "held-out kl 0.0421 → 0.0312, accepted, 20 steps, 4.2 s" in line, line
    block_only = Refinement(mode="block", blocks=REFINEMENT.blocks[:1], seconds=1.5)
    text = render(calibrated_report(None, refinement=block_only), tmp_path)
    assert "block: 1/1 blocks accepted, mean held-out gain 25.0 %" in text and "model refinement" not in text
    assert "refinement" not in render(calibrated_report(None), tmp_path)  # none: no row (the report holds null)


def test_layers_table_lists_blocks_in_the_models_order() -> None:
    report = calibrated_report(None)
    extra = [dict(report["layers"][0], module=f"model.layers.{block}.self_attn.q_proj", block=block) for block in (10, 2, 11)]
    layers = sorted(report["layers"] + extra, key=lambda layer: layer["module"])  # the file's text order: 0, 1, 10, 11, 2
    buffer = io.StringIO()
    Console(file=buffer, width=300).print(cli._layers_table(layers))
    rows = [line.split("│")[1].strip() for line in buffer.getvalue().splitlines() if "model.layers." in line]
    assert [int(row.split(".")[2]) for row in rows] == [0, 0, 1, 1, 2, 10, 11]


def test_progress_line_stays_in_one_metric() -> None:
    layer = LayerReport.from_dict(calibrated_report(None, output_errors=False)["layers"][0])
    line = cli._layer_progress(layer)
    assert "output err 0.1200→0.0300" in line and "0.1000" not in line
    weight = LayerReport.from_dict(calibrated_report(None, objective="weight", output_errors=False)["layers"][0])
    assert "weight err 0.1000→0.0800" in cli._layer_progress(weight)
