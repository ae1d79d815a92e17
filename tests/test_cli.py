"""End-to-end runs of the ``pare`` command line, in-process, on the small CNN and scikit-learn's digits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import pare
from pare.cli._common import Console, format_table, prepare_out_dir
from pare.cli.config_file import read_config
from pare.cli.main import build_parser, main
from pare.errors import ConfigError
from tests.conftest import shared_path

QUIET = ["--quiet"]


def run_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    """Run ``pare --json ARGV`` and return the parsed stdout; fails with stderr on a non-zero exit code."""
    code = main(["--json", *QUIET, *argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``pare prune`` of small_cnn on digits (taylor, 40% MACs, 1 epoch of li2017), shared by the tests."""
    out = tmp_path_factory.mktemp("prune")
    code = main([*QUIET, "prune", "--model", "small_cnn", "--data", "digits", "--criterion", "taylor",
                 "--reduce-macs", "0.4", "--calib-images", "64", "--recalibrate", "1", "--finetune", "li2017",
                 "--epochs", "1", "--lr", "0.05", "--latency-runs", "4", "--seed", "3", "--out", str(out),
                 "--overwrite", "--threads", "1"])
    assert code == 0
    return out


def test_run_replays_a_prune_record(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = json.loads((pruned / "metrics.json").read_text())
    replay = run_json(capsys, ["run", "--config", str(pruned / "metrics.json"), "--threads", "1"])
    assert replay["config"] == metrics["config"]
    for stage in ("dense", "pruned", "finetuned"):
        assert replay["accuracy"][stage]["test"]["top1"] == metrics["accuracy"][stage]["top1"]


def test_prune_writes_artifact_report_and_metrics(pruned: Path) -> None:
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert metrics["criterion"] == "taylor"
    assert metrics["budget"] == "macs_reduction=0.4"
    assert abs(metrics["reduction"]["macs_reduction"] - 0.4) <= 0.005
    assert metrics["counts_after"]["macs"] < metrics["counts_before"]["macs"]
    assert set(metrics["accuracy"]) == {"dense", "pruned", "finetuned"}
    assert metrics["finetune"]["epochs_completed"] == 1
    assert metrics["finetune"]["val_images"] + metrics["finetune"]["train_images"] == metrics["data"]["train_images"]
    assert metrics["latency"]["pruned"]["runs"] >= 1
    assert metrics["provenance"]["seed"] == 3 and metrics["provenance"]["counter_convention"] == "macs"
    widths = {r["path"]: (r["out_channels_before"], r["out_channels"]) for r in metrics["layers"]}
    assert widths["conv4"][1] <= widths["conv4"][0] and widths["linear"] == (10, 10)
    report = (pruned / "report.md").read_text()
    assert "prune --model small_cnn --data digits" in report and "## Per-layer widths" in report
    assert "## Provenance" in report and "torch_version" in report
    assert (pruned / "layer_widths.png").read_bytes()[:4] == b"\x89PNG"
    assert (pruned / "finetune" / "metrics.jsonl").is_file()
    # The artifact is the fine-tuned pruned model: its own counts are the "after" counts.
    model = pare.load(pruned / "model.safetensors")
    assert pare.count(model, torch.zeros(1, 1, 8, 8)).macs == metrics["counts_after"]["macs"]


def test_eval_of_artifact_reproduces_final_epoch_accuracy(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = json.loads((pruned / "metrics.json").read_text())
    result = run_json(capsys, ["eval", str(pruned / "model.safetensors"), "--data", "digits"])
    # Same weights, same recorded normalisation, same test split: the same accuracy as fit's final epoch.
    assert result["metrics"]["top1"] == pytest.approx(metrics["accuracy"]["finetuned"]["top1"], abs=1e-9)
    assert result["normalization"]["name"] == "mnist"


def test_count_uses_recorded_dense_model(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = json.loads((pruned / "metrics.json").read_text())
    result = run_json(capsys, ["count", str(pruned / "model.safetensors")])
    assert result["input_shape"] == [1, 8, 8]
    assert result["before"]["counts"]["macs"] == metrics["counts_before"]["macs"]
    assert result["before"]["reduction"]["macs_reduction"] == pytest.approx(metrics["reduction"]["macs_reduction"])
    explicit = run_json(capsys, ["count", str(pruned / "model.safetensors"), "--before", "small_cnn"])
    assert explicit["before"]["counts"] == result["before"]["counts"]
    alone = run_json(capsys, ["count", "small_cnn", "--input-size", "1x8x8", "--convention", "chip"])
    assert alone["before"] is None and alone["counts"]["convention"] == "chip"


def test_count_table_output(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["count", str(pruned / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "conv4" in out and "32->" in out and "recorded dense model" in out


def test_export_matches_model(pruned: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    target = tmp_path / "m.onnx"
    result = run_json(capsys, ["export", str(pruned / "model.safetensors"), "--output", str(target)])
    assert result["dynamic_batch"] and target.stat().st_size == result["bytes"]
    model = pare.load(pruned / "model.safetensors").eval()
    x = torch.randn(5, 1, 8, 8)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), model(x), rtol=1e-4, atol=1e-5)


def test_bench_reports_median_and_iqr(pruned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, ["bench", str(pruned / "model.safetensors"), "small_cnn", "--batch-sizes", "1,3",
                               "--runs", "4", "--rounds", "2", "--warmup", "1"])
    assert [(r["model"].endswith("model.safetensors"), r["batch_size"]) for r in result["results"]] == [
        (True, 1), (False, 1), (True, 3), (False, 3)]
    for row in result["results"]:
        assert row["q1_ms"] <= row["median_ms"] <= row["q3_ms"] and row["iqr_ms"] >= 0
        assert row["threads"] == 1 and row["backend"] == "eager"


def test_criteria_lists_every_criterion_and_method(capsys: pytest.CaptureFixture[str]) -> None:
    from pare.criteria.base import list_criteria

    result = run_json(capsys, ["criteria"])
    assert [c["name"] for c in result["criteria"]] == [c.name for c in list_criteria()]
    evidence = {m["name"]: m["evidence"] for m in result["methods"]}
    assert evidence == {"dacp": "reconstructed from the abstract", "ista": "paper", "maxplus": "paper",
                        "slimming": "paper + official code"}
    assert main(["criteria"]) == 0
    assert "chip" in capsys.readouterr().out


def test_config_file_with_command_line_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "prune.yaml"
    config.write_text("# flat YAML\nmodel: small_cnn\ninput-size: 1x8x8\ncriterion: l2\nreduce_macs: 0.3\n"
                      "allocation: uniform\nlatency_runs: 0\n")
    result = run_json(capsys, ["prune", "--config", str(config), "--channel-ratio", "0.25",
                               "--out", str(tmp_path / "out")])
    # The command-line budget replaces the file's; the other file options apply.
    assert result["budget"] == "channel_ratio=0.25"
    assert result["criterion"] == "l2" and result["allocation"] == "uniform"
    assert result["latency"] == {}
    as_json = tmp_path / "prune.json"
    as_json.write_text(json.dumps({"model": "small_cnn", "input_size": "1x8x8", "reduce-params": 0.2,
                                   "latency-runs": 0, "no_verify": True}))
    result = run_json(capsys, ["prune", "--config", str(as_json), "--out", str(tmp_path / "out2")])
    assert result["budget"] == "params_reduction=0.2"
    assert abs(result["reduction"]["params_reduction"] - 0.2) <= 0.005


def test_read_config_yaml_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("criterion: fpgm\nreduce-macs: 0.5 # comment\ninput-size: 1x8x8\n")
    assert read_config(path) == {"criterion": "fpgm", "reduce-macs": 0.5, "input-size": "1x8x8"}
    path.write_text("criterion: [fpgm\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_config(path)


def test_train_saves_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, ["train", "small_cnn", "--data", "digits", "--recipe", "li2017", "--epochs", "1",
                               "--lr", "0.05", "--out", str(tmp_path / "t"), "--threads", "1"])
    assert result["train"]["epochs_completed"] == 1
    assert (tmp_path / "t" / "model.safetensors").is_file()
    evaluated = run_json(capsys, ["eval", str(tmp_path / "t" / "model.safetensors"), "--data", "digits"])
    assert evaluated["metrics"]["top1"] == pytest.approx(result["train"]["test_top1_final_epoch"], abs=1e-9)


def test_demo_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pare.criteria.base import list_criteria

    out = tmp_path / "demo"
    result = run_json(capsys, ["demo", "--quick", "--out", str(out)])
    names = [row["name"] for row in result["rows"]]
    assert names == ["dense", *[c.name for c in list_criteria()]]
    for row in result["rows"][1:]:
        assert abs(row["macs_reduction"] - 0.5) <= 0.005
        assert 0.0 <= row["top1"] <= 1.0 and row["latency"]["median_ms"] > 0
    assert result["plots"] == ["accuracy_vs_macs.png", "layer_widths.png"]
    assert set(result["widths"]) == set(names)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["rows"] == result["rows"]
    assert "| **dense** |" in (out / "report.md").read_text()
    assert (out / "models" / "chip.safetensors").is_file()
    # Every row records its pipeline configuration; `pare run --config` replays it to the same figures (the
    # demo runs on one thread, so the replay does too).
    for name in ("taylor", "similarity"):
        replay = run_json(capsys, ["run", "--config", str(out / "metrics.json"), "--row", name, "--threads", "1"])
        row = next(r for r in result["rows"] if r["name"] == name)
        assert replay["accuracy"]["pruned"]["test"]["top1"] == row["top1_before_finetune"]
        assert replay["accuracy"]["finetuned"]["test"]["top1"] == row["top1"]
        assert replay["reduction"]["macs_reduction"] == row["macs_reduction"]
    assert main([*QUIET, "run", "--config", str(out / "metrics.json")]) == 2
    assert "pick one with --row" in capsys.readouterr().err


def test_report_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pare import report

    monkeypatch.setattr(report, "plotting_unavailable", lambda: "matplotlib is not installed (test)")
    record: dict[str, Any] = {"rows": [{"name": "dense", "macs": 10, "params": 5, "top1": 0.9}],
                              "widths": {"dense": {"conv": 4}}, "command": "pare demo"}
    report.write_demo_report(tmp_path, record)
    assert record["plots"] == [] and "Plots were skipped: matplotlib is not installed" in (
        tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("command", ["demo", "prune", "train", "eval", "count", "export", "bench", "criteria"])
def test_every_subcommand_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert "examples:" in capsys.readouterr().out


def test_global_flags_before_or_after_the_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--json", "criteria"], ["criteria", "--json"]):
        assert main(argv) == 0
        assert "criteria" in json.loads(capsys.readouterr().out)
    _, commands = build_parser()
    assert set(commands) == {"demo", "prune", "run", "train", "eval", "count", "export", "bench", "criteria"}


def test_progress_is_off_without_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    assert not Console().progress
    monkeypatch.delenv("CI")
    # Under pytest stdout is captured, so not a terminal.
    assert not Console().progress


def test_format_table_aligns_numbers() -> None:
    text = format_table(["name", "value"], [["a", "1.5 ms"], ["bb", "10.25 ms"]])
    lines = text.splitlines()
    assert lines[2].endswith(" 1.5 ms") and lines[3].endswith("10.25 ms") and len(lines) == 4


def test_demo_overwrites_only_its_own_output(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "prune"}))
    with pytest.raises(ConfigError, match="not empty"):
        prepare_out_dir(tmp_path, overwrite=False, own_kind="demo")
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "demo"}))
    assert prepare_out_dir(tmp_path, overwrite=False, own_kind="demo") == tmp_path


def test_eval_akamaster_resnet20_on_lossless_cifar(capsys: pytest.CaptureFixture[str]) -> None:
    weights = shared_path("weights", "akamaster_resnet20-12fca82f.th")
    data = shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz")
    result = run_json(capsys, ["eval", "resnet20", "--weights", str(weights), "--data", str(data),
                               "--normalization", "imagenet", "--threads", "1"])
    # akamaster reports 91.73% on the full test set; the first 932 test images give a figure close to it.
    assert result["metrics"]["n"] == 932
    assert 0.88 <= result["metrics"]["top1"] <= 0.95
