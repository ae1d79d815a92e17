"""load_checkpoint: layouts, strictness, batch counters, refusal of code-running pickles, corrupt files."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pare.errors import CheckpointError
from pare.io import load_checkpoint, save
from tests.conftest import shared_path

AKAMASTER_RESNET20_SHA256 = "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)
    )


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_plain_state_dict(tmp_path: Path) -> None:
    source, target = _net(0), _net(1)
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)

    info = load_checkpoint(target, path)

    assert _same_params(source, target)
    assert info["format"] == "state-dict" and info["serialization"] == "torch-zip"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["loaded"] == len(source.state_dict())
    assert info["missing"] == [] and info["unexpected"] == [] and info["kept_from_model"] == []


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_wrapped_and_prefixed_state_dicts(tmp_path: Path, key: str) -> None:
    source, target = _net(0), _net(1)
    path = tmp_path / "wrapped.pt"
    state = {f"module.{name}": value for name, value in source.state_dict().items()}
    torch.save({key: state, "epoch": 7, "optimizer": {"lr": 0.1}}, path)

    info = load_checkpoint(target, path)

    assert _same_params(source, target)
    assert info["format"] == "wrapped-state-dict"
    assert info["container_key"] == key
    assert info["prefix_stripped"] == ["module."]
    assert info["extra"] == {"epoch": 7}


def test_akamaster_layout_keeps_batch_counters(tmp_path: Path) -> None:
    source, target = _net(0), _net(1)
    target[1].num_batches_tracked.fill_(123)
    state = {
        f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "resnet.th"
    torch.save({"best_prec1": 91.5, "state_dict": state}, path, _use_new_zipfile_serialization=False)

    info = load_checkpoint(target, path, strict=True)

    assert info["format"] == "akamaster-th" and info["serialization"] == "torch-legacy"
    assert info["kept_from_model"] == ["1.num_batches_tracked"]
    assert info["extra"] == {"best_prec1": 91.5}
    assert int(target[1].num_batches_tracked) == 123
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[1].running_var, source[1].running_var)


def test_strict_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _net(0).state_dict()
    del state["4.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)

    with pytest.raises(
        CheckpointError, match=r"partial\.pth.*missing from file: 4\.bias.*not in model: extra"
    ):
        load_checkpoint(_net(1), path)

    target = _net(1)
    bias_before = target[4].bias.detach().clone()
    info = load_checkpoint(target, path, strict=False)
    assert info["missing"] == ["4.bias"] and info["unexpected"] == ["extra.weight"]
    assert torch.equal(target[4].bias, bias_before)
    assert torch.equal(target[4].weight, state["4.weight"])


def test_shape_mismatch_is_always_an_error(tmp_path: Path) -> None:
    state = _net(0).state_dict()
    state["4.weight"] = torch.zeros(3, 4)
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"wide\.pth.*4\.weight file \(3, 4\) vs model \(2, 4\)"):
        load_checkpoint(_net(1), path, strict=False)


def test_error_names_at_most_five_keys(tmp_path: Path) -> None:
    path = tmp_path / "many.pth"
    torch.save({f"key_{letter}": torch.zeros(1) for letter in "abcdefghijkl"}, path)
    with pytest.raises(CheckpointError, match=r"\(\+7 more\)") as caught:
        load_checkpoint(nn.Linear(1, 1), path)
    assert "key_e" in str(caught.value) and "key_f" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_safetensors_and_artifact_files(tmp_path: Path) -> None:
    source = _net(0)
    plain = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(plain))
    target = _net(1)
    assert load_checkpoint(target, plain)["format"] == "safetensors"
    assert _same_params(source, target)

    artifact = save(source, tmp_path / "a.safetensors")
    target = _net(2)
    assert load_checkpoint(target, artifact)["format"] == "pare-artifact"
    assert _same_params(source, target)


class _CreatesFile:
    """Unpickling this object calls ``open(path, "w")``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_payload_would_execute_under_plain_pickle(tmp_path: Path) -> None:
    # Guards the next test: the payload is live, so its sentinel staying absent means nothing ran.
    sentinel = tmp_path / "ran_under_pickle"
    pickle.loads(pickle.dumps(_CreatesFile(sentinel))).close()
    assert sentinel.exists()


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "raw-pickle"])
def test_code_executing_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "sentinel"
    payload = {"state_dict": {"0.weight": _CreatesFile(sentinel)}}
    path = tmp_path / "evil.pth"
    if writer == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch-zip")

    with pytest.raises(CheckpointError, match=r"evil\.pth") as caught:
        load_checkpoint(_net(0), path)

    assert not sentinel.exists()
    if writer != "raw-pickle":
        assert "open" in str(caught.value)  # the global the payload needed, named in the error


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_checkpoint(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "cut.pth"
    torch.save(_net(0).state_dict(), path, _use_new_zipfile_serialization=zip_format)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        load_checkpoint(_net(1), path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.th"):
        load_checkpoint(_net(0), garbage)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(_net(0), tmp_path / "absent.pth")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(_net(0), not_a_dict)


@pytest.mark.shared
def test_real_akamaster_resnet20_loads_into_zoo_model() -> None:
    path = shared_path("weights", "akamaster_resnet20-12fca82f.th")
    models = pytest.importorskip("pare.models")
    model = models.create("resnet20", num_classes=10)

    info = load_checkpoint(model, path)

    assert info["format"] == "akamaster-th"
    assert info["sha256"] == AKAMASTER_RESNET20_SHA256
    assert info["loaded"] == 97
    assert len(info["kept_from_model"]) == 19  # 19 BatchNorm layers, none with a counter in the file
    assert info["extra"]["best_prec1"] == pytest.approx(91.78, abs=0.01)
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.layer3[2].conv2.weight, raw["module.layer3.2.conv2.weight"])
