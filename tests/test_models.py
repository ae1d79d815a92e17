"""The model zoo: registry, architectures, torchvision/akamaster key compatibility, pretrained weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pare.errors import CheckpointError, ConfigError
from pare.io import load_checkpoint
from pare.layers import ZeroPadShortcut
from pare.models import create, current_spec, list_models
from tests.conftest import shared_path

NATURAL_INPUTS: dict[str, tuple[int, ...]] = {
    "resnet18": (1, 3, 64, 64),  # ImageNet nets at 64x64 for speed
    "resnet34": (1, 3, 64, 64),
    "resnet50": (1, 3, 64, 64),
    "mobilenet_v2": (1, 3, 64, 64),
    "small_cnn": (2, 1, 8, 8),
}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
AKAMASTER = {
    20: "akamaster_resnet20-12fca82f.th",
    32: "akamaster_resnet32-d509ac18.th",
    56: "akamaster_resnet56-4bfd9763.th",
}


def _n_params(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# ---------------------------------------------------------------- registry


def test_registry_lists_every_family() -> None:
    names = list_models()
    expected = {f"resnet{depth}{suffix}" for depth in (20, 32, 44, 56, 110) for suffix in ("", "b")}
    expected |= {
        "vgg16_bn_cifar",
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v2",
        "densenet_cifar",
        "small_cnn",
    }
    assert set(names) == expected
    assert "vgg16" in list_models(include_aliases=True) and "vgg16" not in names


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_runs(name: str) -> None:
    torch.manual_seed(0)
    model = create(name).eval()
    shape = NATURAL_INPUTS.get(name, (1, 3, 32, 32))
    with torch.no_grad():
        logits = model(torch.randn(*shape))
    num_classes = model.pare_zoo["kwargs"]["num_classes"]
    assert logits.shape == (shape[0], num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet56", {"sparsity": "[0.]+[0.15]*2+[0.4]*27", "num_classes": 100}),
        ("vgg16", {"sparsity": [0.3] * 12}),
        ("mobilenet_v2", {"width_mult": 0.5, "num_classes": 7}),
        ("small_cnn", {"in_channels": 3, "width": 4}),
    ],
)
def test_pare_zoo_record_rebuilds_the_same_skeleton(name: str, kwargs: dict[str, object]) -> None:
    model = create(name, **kwargs)
    record = json.loads(json.dumps(model.pare_zoo))  # must survive JSON unchanged
    assert record == model.pare_zoo
    assert record["kwargs"]["num_classes"] == kwargs.get(
        "num_classes", model.pare_zoo["kwargs"]["num_classes"]
    )
    assert "sparsity" in record["kwargs"]
    rebuilt = create(record["name"], **record["kwargs"])
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()}


def test_default_num_classes() -> None:
    assert create("resnet20").pare_zoo["kwargs"]["num_classes"] == 10
    assert create("resnet18").fc.out_features == 1000


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet57'; did you mean .*resnet56"):
        create("resnet57")


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("resnet18", {"sparsity": "[0.1]*20"}, "does not accept sparsity"),
        ("resnet20", {"width_mult": 2.0}, "unknown option 'width_mult'"),
        ("resnet20", {"num_classes": 0}, "num_classes must be a positive int"),
        ("resnet56", {"sparsity": "[0.1]*30", "widths": [16] * 55}, "either sparsity= or widths="),
        ("resnet20", {"widths": [16] * 18}, "expected 19"),
        ("resnet20", {"widths": [16] * 18 + [0]}, "widths[18]"),
        (
            "resnet18",
            {"widths": [64, 64, 32, 64, 64] + [128] * 4 + [256] * 4 + [512] * 4},
            "identity shortcut",
        ),
        ("mobilenet_v2", {"width_mult": -1.0}, "width_mult"),
    ],
)
def test_bad_options_give_config_errors(name: str, kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create(name, **kwargs)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- CIFAR ResNets


def test_option_a_shortcuts() -> None:
    model = create("resnet56")
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer1[1].shortcut, nn.Identity)
    for stage, planes in ((2, 32), (3, 64)):
        shortcut = getattr(model, f"layer{stage}")[0].shortcut
        assert isinstance(shortcut, ZeroPadShortcut)
        assert (shortcut.pad_front, shortcut.pad_back, shortcut.stride) == (planes // 4, planes // 4, 2)
    assert not any(name.endswith("shortcut.weight") for name, _ in model.named_parameters())


def test_option_a_pruned_shortcuts_crop_and_pad() -> None:
    model = create("resnet56", sparsity="[0.]+[0.15]*2+[0.4]*27")
    first = model.layer1[
        0
    ].shortcut  # 16 -> 13 channels at stride 1: crop (13 - 16) // 2 = -2 in front, -1 behind
    assert isinstance(first, ZeroPadShortcut)
    assert (first.pad_front, first.pad_back, first.stride) == (-2, -1, 1)
    second = model.layer2[0].shortcut  # 13 -> 27 at stride 2
    assert (second.pad_front, second.pad_back, second.stride) == (7, 7, 2)
    third = model.layer3[0].shortcut  # 27 -> 64 at stride 2
    assert (third.pad_front, third.pad_back) == (18, 19)
    assert isinstance(model.layer1[1].shortcut, nn.Identity)


def test_explicit_widths_and_pads_rebuild() -> None:
    from_sparsity = create("resnet20", sparsity="[0.25]*3+[0.5]*9")
    widths = [from_sparsity.conv1.out_channels]
    for stage in (from_sparsity.layer1, from_sparsity.layer2, from_sparsity.layer3):
        for block in stage:
            widths.extend([block.conv1.out_channels, block.conv2.out_channels])
    rebuilt = create("resnet20", widths=widths)
    assert [tuple(p.shape) for p in rebuilt.parameters()] == [
        tuple(p.shape) for p in from_sparsity.parameters()
    ]
    pads: list[list[int] | None] = [None] * 9
    pads[3] = [0, 12]  # asymmetric pads, as the pruning engine may leave them: 12 -> 24 channels
    asymmetric = create("resnet20", widths=widths, shortcut_pads=pads)
    assert (asymmetric.layer2[0].shortcut.pad_front, asymmetric.layer2[0].shortcut.pad_back) == (0, 12)
    bad = list(pads)
    bad[3] = [0, 11]
    with pytest.raises(ConfigError, match=r"shortcut_pads\[3\]"):
        create("resnet20", widths=widths, shortcut_pads=bad)


def test_option_b_keys() -> None:
    state = create("resnet20b").state_dict()
    assert tuple(state["layer2.0.shortcut.0.weight"].shape) == (32, 16, 1, 1)
    assert tuple(state["layer2.0.shortcut.1.weight"].shape) == (32,)
    assert "layer1.0.shortcut.0.weight" not in state


def test_block_forward_and_relu_hooks() -> None:
    """relu2 fires once per block, after the addition, and its output is the block output."""
    torch.manual_seed(0)
    model = create("resnet20").eval()
    block = model.layer2[0]
    seen: list[torch.Tensor] = []
    handle = block.relu2.register_forward_hook(lambda module, inputs, output: seen.append(output))
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        out = block(x)
        manual = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))) + block.shortcut(x))
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out)
    assert torch.equal(out, manual)
    relus = [name for name, module in model.named_modules() if isinstance(module, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9 and relus[0] == "relu"


def test_akamaster_key_layout() -> None:
    keys = set(create("resnet56").state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer3.8.bn2.bias", "linear.weight", "linear.bias"} <= keys
    assert not any("shortcut" in key for key in keys)


@pytest.mark.shared
@pytest.mark.parametrize("depth", sorted(AKAMASTER))
def test_akamaster_checkpoints_load(depth: int) -> None:
    path = shared_path("weights", AKAMASTER[depth])
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    raw_keys = set(checkpoint["state_dict"])
    model = create(f"resnet{depth}")
    info = load_checkpoint(model, path)
    # Only BatchNorm's num_batches_tracked buffers are absent from these pre-0.4.1 checkpoints.
    kept = [key for key in model.state_dict() if key.endswith("num_batches_tracked")]
    n_bn = sum(isinstance(module, nn.BatchNorm2d) for module in model.modules())
    assert info["format"] == "akamaster-th"
    assert sorted(info["kept_from_model"]) == sorted(kept) and len(kept) == n_bn
    assert {f"module.{key}" for key in model.state_dict() if key not in kept} == raw_keys
    assert torch.equal(model.linear.weight, checkpoint["state_dict"]["module.linear.weight"])


@pytest.mark.shared
def test_checkpoint_mismatch_is_refused() -> None:
    path = shared_path("weights", AKAMASTER[20])
    with pytest.raises(CheckpointError, match="missing from file"):
        load_checkpoint(create("resnet56"), path)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(create("resnet20", sparsity="[0.5]*12"), path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(create("resnet20"), path.with_name("absent.th"))


def _lossless_test_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz")
    with np.load(path) as archive:
        images = torch.from_numpy(archive["x_test"][:count]).permute(0, 3, 1, 2).float() / 255.0
        labels = torch.from_numpy(archive["y_test"][:count].astype(np.int64))
    return (images - IMAGENET_MEAN) / IMAGENET_STD, labels


@pytest.mark.shared
def test_pretrained_resnet56_classifies_lossless_images() -> None:
    model = create("resnet56")
    load_checkpoint(model, shared_path("weights", AKAMASTER[56]))
    images, labels = _lossless_test_images(64)
    with torch.no_grad():
        correct = int((model.eval()(images).argmax(dim=1) == labels).sum())
    assert correct >= 56  # measured 60 / 64; a wrong shortcut or key mapping gives chance level (~6)


@pytest.mark.shared
def test_pretrained_resnet20_matches_documented_accuracy() -> None:
    """SOURCES.md: ResNet-20 scores 91.63% on the 932 lossless test images (854 correct)."""
    model = create("resnet20")
    load_checkpoint(model, shared_path("weights", AKAMASTER[20]))
    images, labels = _lossless_test_images(932)
    with torch.no_grad():
        correct = int((model.eval()(images).argmax(dim=1) == labels).sum())
    assert abs(correct - 854) <= 2  # allow a borderline image or two to flip with the BLAS thread count


# ---------------------------------------------------------------- VGG, ImageNet nets, DenseNet, small CNN


def test_vgg_layout() -> None:
    model = create("vgg16")
    assert model.pare_zoo["name"] == "vgg16_bn_cifar"
    convs = [module for module in model.features if isinstance(module, nn.Conv2d)]
    assert len(convs) == 13 and all(conv.bias is not None for conv in convs)
    # HRank's relucfg indices: relu modules, except 6/13/23/33 which are the max-pools after conv 2/4/7/10.
    relucfg = [2, 6, 9, 13, 16, 19, 23, 26, 29, 33, 36, 39]
    kinds = [type(model.features[index]).__name__ for index in relucfg]
    assert [index for index, kind in zip(relucfg, kinds) if kind == "MaxPool2d"] == [6, 13, 23, 33]
    assert all(kind in ("ReLU", "MaxPool2d") for kind in kinds)
    state = model.state_dict()
    assert tuple(state["features.conv0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["classifier.linear1.weight"].shape) == (512, 512)
    assert tuple(state["classifier.norm1.running_mean"].shape) == (512,)
    assert tuple(state["classifier.linear2.weight"].shape) == (10, 512)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("mobilenet_v2", 3_504_872),
    ],
)
def test_torchvision_parameter_counts(name: str, params: int) -> None:
    with torch.device("meta"):  # shapes only: skip the weight initialisation
        assert _n_params(create(name)) == params


def test_resnet50_torchvision_keys() -> None:
    with torch.device("meta"):
        model = create("resnet50")
        resnet18_keys = set(create("resnet18").state_dict())
    state = model.state_dict()
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.1.downsample.0.weight" not in state
    # v1.5: the stride sits on the 3x3 conv2, not on conv1.
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    assert "layer1.0.downsample.0.weight" not in resnet18_keys


def test_mobilenet_v2_torchvision_keys() -> None:
    with torch.device("meta"):
        model = create("mobilenet_v2")
    state = model.state_dict()
    expected = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),  # t = 1: no expansion, depthwise first
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.3.weight": (24,),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    residual = [
        index for index, block in enumerate(model.features) if getattr(block, "use_res_connect", False)
    ]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


def test_densenet_concatenates() -> None:
    model = create("densenet_cifar", growth_rate=6, layers_per_block=2).eval()
    x = torch.randn(1, 12, 8, 8)
    with torch.no_grad():
        out = model.block1[0](x)
    assert out.shape == (1, 18, 8, 8)
    assert torch.equal(out[:, :12], x)
    assert model.trans1.conv.out_channels == (12 + 2 * 6) // 2


@pytest.mark.parametrize("side", [8, 28])
def test_small_cnn_on_digits_and_mnist_sizes(side: int) -> None:
    model = create("small_cnn", width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, side, side)).shape == (3, 10)
    assert model.conv4.out_channels == 16


# ---------------------------------------------------------------- rebuild records after pruning


def test_current_spec_rebuilds_pruned_cifar_resnet_with_asymmetric_pads() -> None:
    model = create("resnet20", sparsity="[0.25]*3+[0.5]*9")
    # Mimic the engine removing one zero channel in front of a stage-2 shortcut and one real output channel.
    block = model.layer2[0]
    block.conv2 = nn.Conv2d(block.conv2.in_channels, 23, 3, padding=1, bias=False)
    block.bn2 = nn.BatchNorm2d(23)
    block.shortcut = ZeroPadShortcut(5, 6, 2)
    following = model.layer2[1]
    following.conv1 = nn.Conv2d(23, following.conv1.out_channels, 3, padding=1, bias=False)
    following.conv2 = nn.Conv2d(following.conv2.in_channels, 23, 3, padding=1, bias=False)
    following.bn2 = nn.BatchNorm2d(23)
    model.layer2[2].conv1 = nn.Conv2d(23, model.layer2[2].conv1.out_channels, 3, padding=1, bias=False)
    model.layer2[2].conv2 = nn.Conv2d(model.layer2[2].conv2.in_channels, 23, 3, padding=1, bias=False)
    model.layer2[2].bn2 = nn.BatchNorm2d(23)
    model.layer3[0].conv1 = nn.Conv2d(
        23, model.layer3[0].conv1.out_channels, 3, stride=2, padding=1, bias=False
    )
    model.layer3[0].shortcut = ZeroPadShortcut(20, 21, 2)
    spec = current_spec(model)
    assert spec["kwargs"]["sparsity"] is None
    assert spec["kwargs"]["shortcut_pads"][3] == [5, 6] and spec["kwargs"]["shortcut_pads"][6] == [20, 21]
    rebuilt = create(spec["name"], **json.loads(json.dumps(spec["kwargs"])))
    rebuilt.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("vgg16", {"sparsity": "[0.3]*7+[0.75]*5"}), ("resnet50", {"sparsity": "[0.]+[0.5]*3+[0.6]*16"})],
)
def test_current_spec_reads_widths(name: str, kwargs: dict[str, object]) -> None:
    model = create(name, **kwargs)
    spec = current_spec(model)
    rebuilt = create(spec["name"], **spec["kwargs"])
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in rebuilt.state_dict().items()}


def test_current_spec_refuses_what_it_cannot_rebuild() -> None:
    model = create("mobilenet_v2", width_mult=0.5)
    assert current_spec(model)["kwargs"]["width_mult"] == 0.5
    model.features[1].conv[1] = nn.Conv2d(16, 5, 1, bias=False)
    with pytest.raises(ConfigError, match=r"'features\.1\.conv\.1\.weight' is \(5, 16, 1, 1\) in the model"):
        current_spec(model)
    with pytest.raises(ConfigError, match="no pare_zoo record"):
        current_spec(nn.Linear(2, 2))
