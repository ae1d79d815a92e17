"""Every bad input to ``pare`` ends in exit code 2 and one ``pare: error:`` line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pare
from pare.cli.main import main
from pare.models import create


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run ``pare --quiet ARGV``; check exit 2, exactly one stderr line starting 'pare: error:' that contains
    every ``expected`` fragment, and no traceback. Returns the line."""
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("pare: error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("art") / "small.safetensors"
    pare.save(create("small_cnn"), path, metadata={"input_shape": [1, 8, 8]})
    return path


PRUNE = ["prune", "--model", "small_cnn", "--input-size", "1x8x8", "--latency-runs", "0"]


def test_no_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, [], "required")


def test_unknown_subcommand_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["prun"], "invalid choice", "did you mean prune")


def test_unknown_option(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["count", "small_cnn", "--frobnicate"], "unrecognized arguments")


def test_no_budget(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--out", str(tmp_path / "o")], "no budget")


def test_conflicting_budgets(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--reduce-macs", "0.5", "--channel-ratio", "0.2", "--out", str(tmp_path / "o")],
          "conflicting budgets", "--reduce-macs", "--channel-ratio")


@pytest.mark.parametrize("flag,value", [("--reduce-macs", "1.5"), ("--channel-ratio", "-0.1"),
                                        ("--reduce-params", "1"), ("--reduce-latency", "2")])
def test_ratio_outside_unit_interval(capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str,
                                     value: str) -> None:
    fails(capsys, [*PRUNE, flag, value, "--out", str(tmp_path / "o")], "outside [0, 1)")


def test_ratio_not_a_number(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--reduce-macs", "half", "--out", str(tmp_path / "o")], "not a number")


def test_budget_that_cannot_be_met(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--reduce-params", "0.999", "--out", str(tmp_path / "o")], "cannot reach")


def test_malformed_sparsity_string(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--sparsity", "[0.5]*x", "--out", str(tmp_path / "o")], "sparsity")


def test_unknown_model_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["count", "resnet57", "--input-size", "3x32x32"], "unknown model", "did you mean", "resnet56")


def test_unknown_criterion_suggests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--criterion", "chp", "--reduce-macs", "0.5", "--out", str(tmp_path / "o")],
          "unknown criterion 'chp'", "did you mean chip")


def test_data_driven_criterion_without_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--criterion", "hrank", "--reduce-macs", "0.5", "--out", str(tmp_path / "o")],
          "--data")


def test_missing_weights_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--weights", str(tmp_path / "nope.th"), "--reduce-macs", "0.5", "--out",
                   str(tmp_path / "o")], "nope.th", "no such checkpoint")


def test_corrupt_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"this is not a torch checkpoint" * 10)
    fails(capsys, [*PRUNE, "--weights", str(bad), "--reduce-macs", "0.5", "--out", str(tmp_path / "o")], "bad.th")


def test_checkpoint_of_another_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    other = tmp_path / "other.pt"
    torch.save(create("small_cnn", width=8).state_dict(), other)
    fails(capsys, [*PRUNE, "--weights", str(other), "--reduce-macs", "0.5", "--out", str(tmp_path / "o")],
          "shape mismatch")


def test_truncated_artifact(capsys: pytest.CaptureFixture[str], tmp_path: Path, artifact: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(artifact.read_bytes()[:300])
    fails(capsys, ["count", str(cut)], "cut.safetensors")


def test_checkpoint_given_as_artifact(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ckpt = tmp_path / "plain.pt"
    torch.save(create("small_cnn").state_dict(), ckpt)
    fails(capsys, ["count", str(ckpt)], "--weights")


def test_artifact_with_weights(capsys: pytest.CaptureFixture[str], artifact: Path) -> None:
    fails(capsys, ["export", str(artifact), "--weights", str(artifact), "-o", "x.onnx"],
          "(--weights) cannot be combined")


def test_missing_data_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, ["eval", "small_cnn", "--data", str(tmp_path / "no-data")], "no-data", "no such file")


def test_corrupt_data_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    fails(capsys, ["eval", "small_cnn", "--data", str(bad)], "bad.npz")


def test_cuda_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(capsys, ["eval", "small_cnn", "--data", "digits", "--device", "cuda"], "CUDA is not available")


def test_existing_out_without_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "precious.txt").write_text("earlier results")
    fails(capsys, [*PRUNE, "--reduce-macs", "0.5", "--out", str(out)], "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "earlier results"


def test_existing_onnx_without_overwrite(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                         artifact: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    fails(capsys, ["export", str(artifact), "-o", str(target)], "exists", "--overwrite")


def test_config_not_valid_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text("{criterion: l1")
    fails(capsys, ["prune", "--config", str(config)], "not valid JSON")


def test_config_unknown_key_suggests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": "small_cnn", "reduce_mac": 0.5}))
    fails(capsys, ["prune", "--config", str(config)], "unknown option 'reduce_mac'", "did you mean reduce-macs")


def test_config_wrong_type(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: small_cnn\ncompensate: 3\n")
    fails(capsys, ["prune", "--config", str(config)], "compensate", "true or false")


def test_config_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, ["prune", "--config", str(tmp_path / "none.yaml")], "no such file")


def test_input_size_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["count", "small_cnn"], "--input-size")


def test_bad_input_size(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["count", "small_cnn", "--input-size", "8x8"], "CxHxW")


def test_mean_with_wrong_channel_count(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["eval", "small_cnn", "--data", "digits", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
          "3 values", "1 channels")


def test_bench_rounds_more_than_runs(capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ["bench", "small_cnn", "--input-size", "1x8x8", "--runs", "2", "--rounds", "3"], "--rounds")


def test_finetune_options_without_recipe(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--reduce-macs", "0.5", "--epochs", "3", "--out", str(tmp_path / "o")], "--finetune")


def _subprocess(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CI": "1"}
    return subprocess.run([sys.executable, "-m", "pare.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


def test_subprocess_exit_code_and_single_line(tmp_path: Path) -> None:
    result = _subprocess(["count", "small_cnn", "--input-size", "1x8x8", "--before", str(tmp_path / "x.th")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"pare: error: {tmp_path / 'x.th'}: no such model file (give a "
                                                  "pare artifact or a zoo model name)"]
    assert result.stdout == ""


def test_subprocess_debug_shows_traceback(tmp_path: Path) -> None:
    result = _subprocess(["--debug", "count", "resnet57", "--input-size", "3x32x32"])
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("pare: error: unknown model 'resnet57'")


# ------------------------------------------------------------------------------------ issue #11 bad inputs
def _nan_artifact(path: Path) -> Path:
    model = create("small_cnn")
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    return pare.save(model, path, metadata={"input_shape": [1, 8, 8]})


def test_input_size_with_wrong_channels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, ["count", "resnet20", "--input-size", "1x32x32"], "input size 1x32x32 does not fit", "channels")
    out = tmp_path / "o"
    fails(capsys, ["prune", "--model", "resnet20", "--input-size", "1x32x32", "--reduce-macs", "0.3", "--out",
                   str(out)], "1x32x32")
    assert not out.exists()  # no empty --out folder after a failed check


def test_unknown_criterion_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, [*PRUNE, "--reduce-macs", "0.3", "--criterion", "fpgm", "--criterion-option", "bogus=1",
                   "--out", str(tmp_path / "o")], "no option bogus", "valid options: distance")


def test_criterion_option_errors_at_library_level() -> None:
    from pare.criteria.base import get_criterion
    from pare.errors import ConfigError

    with pytest.raises(ConfigError, match="valid options: distance"):
        get_criterion("fpgm", bogus=1)


@pytest.mark.parametrize("version", [-7, 0, 2, "1", True])
def test_bad_format_version(capsys: pytest.CaptureFixture[str], tmp_path: Path, artifact: Path,
                            version: object) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(artifact), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    spec = json.loads(metadata["pare.spec"])
    spec["format_version"] = version
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, "pare.spec": json.dumps(spec)})
    fails(capsys, ["count", str(bad)], f"format_version {version!r} is not supported")


def test_truncated_cifar_test_batch_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]})
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    fails(capsys, ["eval", "small_cnn", "--data", str(folder)], "test_batch", "truncated")


def test_nan_weights_are_named_before_pruning(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    art = _nan_artifact(tmp_path / "nan.safetensors")
    fails(capsys, ["prune", "--model", str(art), "--reduce-macs", "0.3", "--out", str(tmp_path / "o")],
          "non-finite weights", "'conv2.weight'")
    fails(capsys, ["export", str(art), "-o", str(tmp_path / "m.onnx")], "non-finite weights", "'conv2.weight'")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "o").exists()


def test_nan_weights_warn_on_eval(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    art = _nan_artifact(tmp_path / "nan.safetensors")
    assert main(["--quiet", "eval", str(art), "--data", "digits", "--normalization", "none"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pare: warning:") and "'conv2.weight'" in err[0]


def test_eval_input_size_must_match_data(capsys: pytest.CaptureFixture[str], artifact: Path) -> None:
    fails(capsys, ["eval", str(artifact), "--data", "digits", "--input-size", "1x16x16"],
          "--input-size 1x16x16 does not match the data's images (1x8x8)")
