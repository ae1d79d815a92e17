"""ONNX export: outputs under onnxruntime match PyTorch for pruned forms (GraphModule, ZeroPadShortcut)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from pare.errors import ConfigError
from pare.evaluate import recalibrate_bn
from pare.io import ExportError, export_onnx
from pare.io import onnx as pare_onnx
from pare.layers import ZeroPadShortcut

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install pare[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install pare[onnx])")


class _ShortcutNet(nn.Module):
    """Residual block with an option-A shortcut whose pads differ, as after pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 9, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(9)
        self.shortcut = ZeroPadShortcut(2, 4, stride=2)
        self.fc = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = F.relu(y + self.shortcut(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class _SplitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), [3, 5], dim=1)
        a = F.pad(a, (0, 0, 0, 0, 1, 1))
        y = torch.cat([a, b], dim=1).mean(dim=(2, 3))
        return self.fc(y.view(y.size(0), -1))


def _pruned_graph_module() -> fx.GraphModule:
    """Traced _SplitNet whose conv lost 2 channels; split sizes and pads are rewritten to keep 8 outputs."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_SplitNet())
    conv = nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(gm.conv.weight[[0, 2, 3, 4, 6, 7]])
        conv.bias.copy_(gm.conv.bias[[0, 2, 3, 4, 6, 7]])
    gm.conv = conv
    for node in gm.graph.nodes:
        if node.target is torch.split:
            node.args = (node.args[0], [2, 4])
        if node.target is F.pad:
            node.args = (node.args[0], (0, 0, 0, 0, 1, 1))
    gm.recompile()
    return gm


def _randomised(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under a fixed seed, with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = build()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


@pytest.mark.parametrize(
    "build", [_ShortcutNet, _pruned_graph_module], ids=["zero_pad_shortcut", "graph_module"]
)
def test_onnx_matches_pytorch(tmp_path: Path, build: Callable[[], nn.Module]) -> None:
    model = _randomised(build)
    example = torch.randn(2, 3, 16, 16)
    path = export_onnx(model, example, tmp_path / "m.onnx")

    assert [entry.version for entry in onnx.load(str(path)).opset_import if entry.domain == ""] == [17]
    for batch in (2, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(_run_onnx(path, x), expected, atol=1e-4, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_export_restores_training_flags(tmp_path: Path) -> None:
    model = _ShortcutNet().train()
    model.bn1.eval()
    flags = [m.training for m in model.modules()]
    export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert [m.training for m in model.modules()] == flags


def test_falls_back_to_dynamo_exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("TorchScript exporter unavailable (simulated)")

    monkeypatch.setattr(pare_onnx, "_export_torchscript", broken)
    model = _randomised(_ShortcutNet)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(model, x, tmp_path / "m.onnx")
    (written,) = [entry.version for entry in onnx.load(str(path)).opset_import if entry.domain == ""]
    # With onnx 1.23 the dynamo exporter writes opset 18 (no Pad down-converter); that must not pass silently.
    assert written == 17 or any(f"opset {written}, not the requested 17" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(path, x), model(x), atol=1e-4, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # single file, no external .data


def test_failed_export_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")

    def half_written(model: nn.Module, inputs: object, out: Path, *args: object) -> None:
        out.write_bytes(b"partial")
        raise RuntimeError("exporter crashed (simulated)")

    monkeypatch.setattr(pare_onnx, "_export_torchscript", half_written)
    monkeypatch.setattr(pare_onnx, "_export_dynamo", half_written)
    with pytest.raises(ExportError, match=r"torchscript: RuntimeError.*dynamo: RuntimeError"):
        export_onnx(_ShortcutNet(), torch.randn(1, 3, 8, 8), path)
    assert path.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="exporter"):
        export_onnx(_ShortcutNet(), torch.randn(1, 3, 8, 8), "m.onnx", exporter="tflite")
    with pytest.raises(ConfigError, match="example_inputs"):
        export_onnx(_ShortcutNet(), [], "m.onnx")


def test_zoo_resnet20_exports(tmp_path: Path) -> None:
    models = pytest.importorskip("pare.models")
    torch.manual_seed(0)
    model = models.create("resnet20", num_classes=10)
    # Statistics from data keep the untrained net's logits O(1), so atol=1e-4 is a fair float32 comparison.
    recalibrate_bn(model, [torch.randn(32, 3, 32, 32)], batches=1).eval()
    x = torch.randn(3, 3, 32, 32)
    path = export_onnx(model, x, tmp_path / "r20.onnx")
    with torch.no_grad():
        torch.testing.assert_close(_run_onnx(path, x), model(x), atol=1e-4, rtol=0)
