"""Pickle-free artifacts: round trips of hand-pruned models (tree, fx, user class, zoo), safety, atomicity."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

import pare
from pare.errors import CheckpointError, ConfigError
from pare.io import artifact, load, load_checkpoint, read_metadata, save
from pare.io._layers import LEAF_TYPES, build_leaf, describe_leaf
from pare.layers import ZeroPadShortcut
from tests.conftest import shared_path


def _shrunk_conv(conv: nn.Conv2d, out_keep: list[int] | None, in_keep: list[int] | None) -> nn.Conv2d:
    """A smaller Conv2d holding the kept output/input channels of ``conv`` (weight (out, in, kh, kw))."""
    weight = conv.weight.detach()
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_keep] if out_keep is not None else conv.bias.detach())
    return new


def _shrunk_bn(bn: nn.BatchNorm2d, keep: list[int]) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    with torch.no_grad():
        new.weight.copy_(bn.weight[keep])
        new.bias.copy_(bn.bias[keep])
        new.running_mean.copy_(bn.running_mean[keep])
        new.running_var.copy_(bn.running_var[keep])
    return new


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running stats, so that a wrongly restored buffer changes the output."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))


def _assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ------------------------------------------------------------------------------------- (a) container tree
def _pruned_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(8, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    _randomise_bn(model)
    keep = [0, 2, 3, 5, 7]
    model[0] = _shrunk_conv(model[0], keep, None)
    model[1] = _shrunk_bn(model[1], keep)
    model[3] = _shrunk_conv(model[3], None, keep)
    return model


def test_tree_roundtrip_keeps_outputs_dtype_flags_and_frozen(tmp_path: Path) -> None:
    model = _pruned_sequential().double()
    model.train()
    model[7].eval()  # a mixed flag must survive too
    model[9].weight.requires_grad_(False)
    path = save(model, tmp_path / "m.safetensors", metadata={"criterion": "l1", "budget": 0.5})

    loaded = load(path)

    assert isinstance(loaded, nn.Sequential)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert loaded[0].out_channels == 5 and loaded[3].in_channels == 5
    assert loaded[2].negative_slope == 0.1 and loaded[2].inplace
    assert [m.training for m in loaded.modules()] == [m.training for m in model.modules()]
    assert loaded[0].weight.dtype == torch.float64
    assert not loaded[9].weight.requires_grad and loaded[0].weight.requires_grad
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    _assert_same_outputs(model, loaded, torch.randn(2, 3, 16, 16, dtype=torch.float64))


def test_read_metadata_has_spec_and_provenance(tmp_path: Path) -> None:
    path = save(
        _pruned_sequential(),
        tmp_path / "m.safetensors",
        metadata={"source_sha256": "ab" * 32, "counts": [1, 2]},
    )
    meta = read_metadata(path)
    assert meta["spec"]["kind"] == "tree"
    assert meta["spec"]["format_version"] == artifact.FORMAT_VERSION
    leaves = meta["spec"]["tree"]["children"]
    assert leaves[0] == [
        "0",
        {
            "kind": "leaf",
            "type": "Conv2d",
            "args": {
                "in_channels": 3,
                "out_channels": 5,
                "kernel_size": [3, 3],
                "stride": [1, 1],
                "padding": [1, 1],
                "dilation": [1, 1],
                "groups": 1,
                "padding_mode": "zeros",
                "bias": False,
            },
        },
    ]
    provenance = meta["provenance"]
    assert provenance["pare_version"] == pare.__version__
    assert provenance["torch_version"] == torch.__version__
    assert provenance["source_sha256"] == "ab" * 32
    assert provenance["counts"] == [1, 2]
    assert provenance["created_utc"].endswith("+00:00")
    assert provenance["git_commit"] is None or len(provenance["git_commit"]) == 40


def test_metadata_must_be_json_and_not_reserved(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'when'"):
        save(_pruned_sequential(), tmp_path / "a.safetensors", metadata={"when": object()})
    with pytest.raises(ConfigError, match="reserved"):
        save(_pruned_sequential(), tmp_path / "a.safetensors", metadata={"pare_version": "9"})
    assert not (tmp_path / "a.safetensors").exists()


# ------------------------------------------------------------------------------------------- (b) fx graph
class _SplitPadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(13 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        a, b = torch.split(y, [3, 5], dim=1)
        a = F.pad(a[:, :, ::2, ::2], (0, 0, 0, 0, 2, 3))
        z = torch.clamp(torch.cat([a, b[:, :, ::2, ::2]], dim=1) * 0.5, max=float("inf"))
        z = F.max_pool2d(z, 2)
        return self.head(z.view(z.size(0), -1).to(torch.float32))


def _pruned_graph_module() -> fx.GraphModule:
    torch.manual_seed(0)
    net = _SplitPadNet()
    _randomise_bn(net)
    gm = fx.symbolic_trace(net)
    keep = [0, 2, 4, 5, 6, 7]  # drop channel 1 (first split part) and 3 (second part)
    gm.conv = _shrunk_conv(gm.conv, keep, None)
    gm.bn = _shrunk_bn(gm.bn, keep)
    # The first part shrinks 3 -> 2 channels and is padded to 8 again, the second shrinks 5 -> 4: 12 in all.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.split:
            node.args = (node.args[0], [2, 4])
        if node.op == "call_function" and node.target is F.pad:
            node.args = (node.args[0], (0, 0, 0, 0, 3, 3))
    gm.head = nn.Linear(12 * 4 * 4, 5)
    gm.recompile()
    return gm


def test_graph_module_roundtrip(tmp_path: Path) -> None:
    gm = _pruned_graph_module()
    x = torch.randn(2, 3, 16, 16)
    gm.eval()
    assert gm(x).shape == (2, 5)
    path = save(gm, tmp_path / "g.safetensors")

    loaded = load(path)

    assert isinstance(loaded, fx.GraphModule)
    assert type(loaded).__name__ == "_SplitPadNet"
    old_nodes = [(n.op, n.name, n.target, n.args, n.kwargs) for n in gm.graph.nodes]
    new_nodes = [(n.op, n.name, n.target, n.args, n.kwargs) for n in loaded.graph.nodes]
    assert repr(old_nodes) == repr(new_nodes)
    split = next(n for n in loaded.graph.nodes if n.target is torch.split)
    assert split.args[1] == [2, 4]
    _assert_same_outputs(gm, loaded, x)


class _ContainerNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.register_buffer("scale", torch.tensor([2.0]))
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) * self.scale + torch.tensor([1.0])  # the literal becomes a _tensor_constant0 buffer
        return self.heads["a"](y.mean((2, 3))).softmax(-1)


def test_graph_module_with_containers_buffers_and_constants(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(_ContainerNet())
    assert {n.target for n in gm.graph.nodes if n.op == "get_attr"} == {"scale", "_tensor_constant0"}
    loaded = load(save(gm, tmp_path / "c.safetensors"))
    assert type(loaded.body) is type(gm.body) and type(loaded.heads) is type(gm.heads)  # fx made them holders
    assert torch.equal(loaded._tensor_constant0, torch.tensor([1.0]))
    _assert_same_outputs(gm, loaded, torch.randn(2, 3, 4, 4))


def test_graph_module_with_foreign_module_is_refused_at_save(tmp_path: Path) -> None:
    class Custom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Custom) or super().is_leaf_module(m, qualname)

    root = nn.Sequential(nn.Linear(2, 2), Custom())
    gm = fx.GraphModule(root, Tracer().trace(root))
    with pytest.raises(CheckpointError, match="contains 1"):
        save(gm, tmp_path / "g.safetensors")
    assert not (tmp_path / "g.safetensors").exists()


def _tamper_spec(path: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    spec = json.loads(metadata[artifact.SPEC_KEY])
    edit(spec)
    metadata[artifact.SPEC_KEY] = json.dumps(spec)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _node(spec: dict, name: str) -> dict:
    return next(n for n in spec["tree"]["graph"]["nodes"] if n["name"] == name)


@pytest.mark.parametrize(
    ("node_name", "field", "value", "message"),
    [
        ("split", "target", "builtins:eval", "not allowlisted"),
        ("split", "target", "os:system", "not allowlisted"),
        ("split", "target", "torch:load", "not allowlisted"),
        ("size", "target", "__class__", "not a valid name"),
        ("size", "target", "register_hook", "not allowed"),
        ("size", "target", "no_such_method", "not a Tensor method"),
        ("conv", "target", "conv.__dict__", "not a valid module path"),
    ],
)
def test_tampered_graph_is_refused(
    tmp_path: Path, node_name: str, field: str, value: str, message: str
) -> None:
    path = save(_pruned_graph_module(), tmp_path / "g.safetensors")

    def edit(spec: dict) -> None:
        _node(spec, node_name)[field] = value

    bad = _tamper_spec(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load(bad)


def test_tampered_getattr_and_leaf_type_are_refused(tmp_path: Path) -> None:
    path = save(_pruned_graph_module(), tmp_path / "g.safetensors")

    def private_getattr(spec: dict) -> None:
        node = _node(spec, "size")
        node.update(op="call_function", target="builtins:getattr", args={"t": [{"n": "conv"}, "__globals__"]})

    with pytest.raises(CheckpointError, match="getattr"):
        load(_tamper_spec(path, tmp_path / "b1.safetensors", private_getattr))

    def foreign_leaf(spec: dict) -> None:
        dict(spec["tree"]["children"])["conv"]["type"] = "os.system"

    with pytest.raises(CheckpointError, match="not allowlisted"):
        load(_tamper_spec(path, tmp_path / "b2.safetensors", foreign_leaf))


# ---------------------------------------------------------------------------------- (c) user class + skeleton
class _UserNet(nn.Module):
    """A user class pare cannot rebuild on its own: its forward is custom Python."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.shortcut = ZeroPadShortcut(2, 2, stride=2)
        self.down = nn.Conv2d(8, 4, 1, stride=2, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = F.relu(self.shortcut(self.down(y)) + y[:, :, ::2, ::2])
        return self.fc(z.mean(dim=(2, 3)))


def _pruned_user_net() -> _UserNet:
    torch.manual_seed(0)
    net = _UserNet()
    _randomise_bn(net)
    keep = [1, 2, 4, 6, 7]
    net.conv1 = _shrunk_conv(net.conv1, keep, None)
    net.bn1 = _shrunk_bn(net.bn1, keep)
    net.conv2 = _shrunk_conv(net.conv2, None, keep)
    # Drop 2 of the 4 down channels; the shortcut pads 1 front and 3 back to keep the 8-channel sum.
    net.down = _shrunk_conv(net.down, [0, 3], None)
    net.shortcut = ZeroPadShortcut(1, 5, stride=1)
    return net


def test_user_class_needs_skeleton(tmp_path: Path) -> None:
    net = _pruned_user_net()
    x = torch.randn(2, 3, 8, 8)
    path = save(net, tmp_path / "u.safetensors")
    assert read_metadata(path)["spec"]["kind"] == "skeleton"

    with pytest.raises(CheckpointError, match="pass skeleton="):
        load(path)
    with pytest.raises(CheckpointError, match="saved from"):
        load(path, skeleton=_SplitPadNet())

    loaded = load(path, skeleton=_UserNet())
    assert isinstance(loaded, _UserNet)
    assert loaded.shortcut.pad_front == 1 and loaded.shortcut.pad_back == 5 and loaded.shortcut.stride == 1
    assert loaded.conv1.out_channels == 5
    _assert_same_outputs(net, loaded, x)


def test_skeleton_kept_leaf_must_match(tmp_path: Path) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.scale = Scale()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(self.lin(x))

    net = Holder()
    with torch.no_grad():
        net.scale.gain.fill_(3.0)
    path = save(net, tmp_path / "h.safetensors")
    leaves = read_metadata(path)["spec"]["leaves"]
    assert {"path": "scale", "type": f"{Scale.__module__}.{Scale.__qualname__}", "kept": True} in leaves
    loaded = load(path, skeleton=Holder())
    assert loaded.scale.gain.item() == 3.0
    _assert_same_outputs(net, loaded, torch.randn(3, 4))
    skeleton = Holder()
    skeleton.scale = nn.Identity()
    with pytest.raises(CheckpointError, match="leaf 'scale'"):
        load(path, skeleton=skeleton)


# --------------------------------------------------------------------------------------- (d) zoo models
def test_zoo_resnet_roundtrip_without_skeleton(tmp_path: Path) -> None:
    models = pytest.importorskip("pare.models")
    torch.manual_seed(0)
    net = models.create("resnet20", num_classes=10)
    _randomise_bn(net)
    block = net.layer1[0]
    keep = list(range(0, 16, 2))
    block.conv1 = _shrunk_conv(block.conv1, keep, None)
    block.bn1 = _shrunk_bn(block.bn1, keep)
    block.conv2 = _shrunk_conv(block.conv2, None, keep)
    path = save(net, tmp_path / "z.safetensors")
    spec = read_metadata(path)["spec"]
    assert spec["kind"] == "zoo" and spec["zoo"]["name"] == net.pare_zoo["name"]

    loaded = load(path)

    assert type(loaded) is type(net)
    assert loaded.layer1[0].conv1.out_channels == 8
    assert loaded.pare_zoo == net.pare_zoo
    _assert_same_outputs(net, loaded, torch.randn(2, 3, 32, 32))


def test_zoo_unknown_name_is_a_clear_error(tmp_path: Path) -> None:
    models = pytest.importorskip("pare.models")
    net = models.create("resnet20", num_classes=10)
    path = save(net, tmp_path / "z.safetensors")

    def rename(spec: dict) -> None:
        spec["zoo"]["name"] = "no_such_model"

    with pytest.raises(CheckpointError, match="no_such_model"):
        load(_tamper_spec(path, tmp_path / "bad.safetensors", rename))


# ------------------------------------------------------------------------------------------- robustness
def test_atomic_write_failure_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(_pruned_sequential(), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("pare.io._atomic.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="simulated"):
        save(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(OSError, match="simulated"):
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "new.safetensors")

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_not_an_artifact_and_truncated_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a pare artifact"):
        load(plain)
    with pytest.raises(CheckpointError, match="not a pare artifact"):
        read_metadata(plain)
    good = save(_pruned_sequential(), tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors"):
        load(cut)
    with pytest.raises(CheckpointError, match="no such"):
        load(tmp_path / "absent.safetensors")


def test_tensor_shape_tampering_is_detected(tmp_path: Path) -> None:
    path = save(_pruned_sequential(), tmp_path / "m.safetensors")

    def widen(spec: dict) -> None:
        spec["tree"]["children"][0][1]["args"]["out_channels"] = 6

    with pytest.raises(CheckpointError, match=r"0\.weight"):
        load(_tamper_spec(path, tmp_path / "bad.safetensors", widen))


_LEAF_EXAMPLES: list[nn.Module] = [
    nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="reflect"),
    nn.Conv2d(4, 6, (3, 1), padding="same"),
    nn.Conv3d(2, 3, 1),
    nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    nn.Linear(5, 3, bias=False),
    nn.BatchNorm1d(7, eps=1e-3, momentum=None),
    nn.BatchNorm2d(7, affine=False, track_running_stats=False),
    nn.InstanceNorm2d(7, affine=True),
    nn.GroupNorm(2, 6, eps=1e-4),
    nn.LayerNorm([6, 4], elementwise_affine=True, bias=False),
    nn.PReLU(6),
    nn.LeakyReLU(0.2, inplace=True),
    nn.Hardtanh(-2.0, 3.0),
    nn.GELU(approximate="tanh"),
    nn.Softmax(dim=1),
    nn.Dropout2d(0.25),
    nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
    nn.AdaptiveAvgPool2d((1, 2)),
    nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
    nn.Flatten(2, -1),
    nn.Unflatten(1, (2, 3)),
    nn.ConstantPad2d((1, 2, 0, 1), 0.5),
    nn.PixelShuffle(2),
    nn.ChannelShuffle(3),
    ZeroPadShortcut(-1, 3, stride=3),
]


@pytest.mark.parametrize("module", _LEAF_EXAMPLES, ids=lambda m: type(m).__name__)
def test_leaf_description_rebuilds_same_module(module: nn.Module) -> None:
    desc = json.loads(json.dumps(describe_leaf(module, "x")))
    with torch.device("meta"):
        rebuilt = build_leaf(desc, "x")
    assert type(rebuilt) is type(module)
    assert describe_leaf(rebuilt, "x") == desc
    assert repr(rebuilt) == repr(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }


def test_allowlist_holds_the_pruning_layer_types() -> None:
    for name in ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear", "BatchNorm2d", "GroupNorm"):
        assert name in LEAF_TYPES
    for name in ("InstanceNorm2d", "LayerNorm", "PReLU", "ZeroPadShortcut", "ReLU", "Identity"):
        assert name in LEAF_TYPES


@pytest.mark.shared
def test_real_checkpoint_artifact_roundtrip(tmp_path: Path) -> None:
    weights = shared_path("weights", "akamaster_resnet20-12fca82f.th")
    models = pytest.importorskip("pare.models")
    net = models.create("resnet20", num_classes=10)
    info = load_checkpoint(net, weights)
    path = save(net, tmp_path / "r20.safetensors", metadata={"source_sha256": info["sha256"]})
    assert read_metadata(path)["provenance"]["source_sha256"] == info["sha256"]
    loaded = load(path)
    assert torch.equal(loaded.layer2[0].conv1.weight, net.layer2[0].conv1.weight)
    _assert_same_outputs(net, loaded, torch.randn(4, 3, 32, 32))
