"""The MACs/params counter against the exact figures of methods.md §7.1, §7.2 and §10 checks 1-6."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pare.count import Counts, count
from pare.errors import ConfigError
from pare.models import create, parse_sparsity

CIFAR_INPUT = (1, 3, 32, 32)


@functools.cache
def _cifar_counts_macs(name: str, sparsity: str | None) -> Counts:
    torch.manual_seed(0)
    return count(create(name, sparsity=sparsity), torch.randn(*CIFAR_INPUT), convention="macs")


def _cifar_counts(name: str, sparsity: str | None = None, convention: str = "macs") -> Counts:
    # Counting is deterministic: tests share one count per model; only the headline convention differs.
    return dataclasses.replace(_cifar_counts_macs(name, sparsity), convention=convention)


def _bn2d_elements(counts: Counts) -> int:
    # The §7.2 "BN elements" column sums BatchNorm2d maps only, without VGG's classifier BatchNorm1d (512).
    return sum(layer.bn_elements for layer in counts.layers if layer.type == "BatchNorm2d")


def _conv_out_channels(model: nn.Module) -> list[int]:
    return [module.out_channels for module in model.modules() if isinstance(module, nn.Conv2d)]


# ---------------------------------------------------------------- §10 check 1: the sparsity-string parser


@pytest.mark.parametrize(
    ("text", "length"),
    [
        ("[0.]+[0.15]*2+[0.4]*27", 30),
        ("[0.]+[0.2]*2+[0.3]*18+[0.35]*36", 57),
        ("[0.21]*7+[0.75]*5", 12),
    ],
)
def test_parser_lengths(text: str, length: int) -> None:
    assert len(parse_sparsity(text)) == length


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=99), st.integers(min_value=1, max_value=40)),
        min_size=1,
        max_size=6,
    )
)
def test_parser_round_trip(terms: list[tuple[int, int]]) -> None:
    ratios = [percent / 100 for percent, _ in terms]
    text = "+".join(f"[{ratio!r}]*{repeats}" for ratio, (_, repeats) in zip(ratios, terms))
    expected = [ratio for ratio, (_, repeats) in zip(ratios, terms) for _ in range(repeats)]
    assert parse_sparsity(text) == expected


def test_parser_values_and_forms() -> None:
    assert parse_sparsity("[0.]+[0.15]*2+[0.4]*3") == [0.0, 0.15, 0.15, 0.4, 0.4, 0.4]
    assert parse_sparsity(" [.5] * 2 + [1e-1] ") == [0.5, 0.5, 0.1]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("[0.1]*2+", "term 2"),
        ("[0.1]x2", "not of the form"),
        ("0.1*2", "not of the form"),
        ("[abc]", "not of the form"),
        ("[0.1]*0", "n >= 1"),
        ("[1.0]", "outside [0, 1)"),
        ("[-0.1]", "not of the form"),
        ("[0.5]*2+[1.5]", "outside [0, 1)"),
    ],
)
def test_parser_rejects_malformed(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_sparsity(text)
    assert fragment in str(info.value)


def test_sparsity_length_checked_per_model() -> None:
    with pytest.raises(ConfigError, match="expected 30"):
        create("resnet56", sparsity="[0.]+[0.15]*2+[0.4]*26")
    with pytest.raises(ConfigError, match="expected 12"):
        create("vgg16", sparsity="[0.21]*13")
    with pytest.raises(ConfigError, match="at least 1 must stay"):
        create("resnet56", sparsity="[0.99]+[0.]*29")


# ---------------------------------------------------------------- §10 check 2: width semantics


def test_resnet56_width_semantics() -> None:
    model = create("resnet56", sparsity="[0.]+[0.15]*2+[0.4]*27")
    assert model.conv1.out_channels == 16
    for stage, (out_width, mid_width) in enumerate([(13, 9), (27, 19), (64, 38)], start=1):
        for block in getattr(model, f"layer{stage}"):
            assert block.conv1.out_channels == mid_width
            assert block.conv2.out_channels == out_width
    # Stage-3 outputs are never pruned, whatever the ratios.
    heavy = create("resnet56", sparsity="[0.5]*30")
    assert {block.conv2.out_channels for block in heavy.layer3} == {64}
    assert heavy.linear.in_features == 64


def test_vgg_width_semantics() -> None:
    model = create("vgg16", sparsity="[0.21]*7+[0.75]*5")
    assert _conv_out_channels(model) == [50, 50, 101, 101, 202, 202, 202, 128, 128, 128, 128, 128, 512]
    heavy = create("vgg16", sparsity="[0.9]*12")
    assert _conv_out_channels(heavy)[-1] == 512


def test_resnet50_width_semantics() -> None:
    with torch.device("meta"):
        model = create("resnet50", sparsity="[0.]+[0.1]*3+[0.35]*16")
    assert model.conv1.out_channels == 64
    expected = {1: (230, 41), 2: (460, 83), 3: (921, 166), 4: (2048, 332)}
    for stage, (out_width, mid_width) in expected.items():
        for block in getattr(model, f"layer{stage}"):
            assert (block.conv1.out_channels, block.conv2.out_channels) == (mid_width, mid_width)
            assert block.conv3.out_channels == out_width


# ---------------------------------------------------------------- §10 check 3: every row of the §7.2 table

RESNET_ROWS = [
    # (model, sparsity, conv+FC MACs, BN elements, reported value in M under the CHIP convention)
    ("resnet56", "[0.]+[0.15]*2+[0.4]*27", 65_168_128, 383_872, 65.94),
    ("resnet56", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 34_197_184, 292_288, 34.78),
    ("resnet56", "[0.]+[0.18]*29", 89_460_352, 442_624, 90.35),
    ("resnet110", "[0.]+[0.2]*2+[0.3]*18+[0.35]*36", 139_006_144, 768_640, 140.54),
    ("resnet110", "[0.]+[0.22]*2+[0.35]*18+[0.45]*36", 119_638_144, 724_864, 121.09),
    ("resnet110", "[0.]+[0.4]*2+[0.5]*18+[0.65]*36", 70_554_880, 567_040, 71.69),
]


@pytest.mark.parametrize(("name", "sparsity", "macs", "bn_elements", "reported_m"), RESNET_ROWS)
def test_table_7_2_resnet_rows(
    name: str, sparsity: str, macs: int, bn_elements: int, reported_m: float
) -> None:
    counts = _cifar_counts(name, sparsity, convention="chip")
    assert counts.conv_macs + counts.linear_macs == macs
    assert counts.conv_bias_adds == 0
    assert counts.bn_elements == bn_elements
    assert counts.macs == macs + 2 * bn_elements
    assert round(counts.macs / 1e6, 2) == reported_m


VGG_ROWS = [
    # (sparsity, conv MACs, conv + bias adds + FC MACs, BatchNorm2d elements, reported value in M)
    ("[0.21]*7+[0.75]*5", 130_299_264, 130_768_640, 202_112, 131.17),
    ("[0.3]*7+[0.75]*5", 103_975_488, 104_422_016, 179_264, 104.78),
    ("[0.45]*7+[0.78]*5", 66_253_824, 66_663_808, 142_720, 66.95),
]


@pytest.mark.parametrize(("sparsity", "conv_macs", "with_bias_fc", "bn_elements", "reported_m"), VGG_ROWS)
def test_table_7_2_vgg_rows(
    sparsity: str, conv_macs: int, with_bias_fc: int, bn_elements: int, reported_m: float
) -> None:
    counts = _cifar_counts("vgg16_bn_cifar", sparsity, convention="chip")
    assert counts.conv_macs == conv_macs
    assert counts.linear_macs == 512 * 512 + 512 * 10
    assert counts.conv_macs + counts.conv_bias_adds + counts.linear_macs == with_bias_fc
    assert _bn2d_elements(counts) == bn_elements
    # The counter also counts the classifier's BatchNorm1d; §7.2 notes it does not move the rounded value.
    assert counts.bn_elements == bn_elements + 512
    assert round(counts.macs / 1e6, 2) == reported_m


@pytest.mark.parametrize(
    ("name", "macs", "bn_elements", "chip_m"),
    [("resnet56", 125_485_696, 532_480, 126.55), ("resnet110", 252_887_680, 1_048_576, 254.98)],
)
def test_table_7_2_unpruned_rows(name: str, macs: int, bn_elements: int, chip_m: float) -> None:
    counts = _cifar_counts(name, convention="chip")
    assert counts.conv_macs + counts.linear_macs == macs
    assert counts.bn_elements == bn_elements
    assert round(counts.macs / 1e6, 2) == chip_m


# ---------------------------------------------------------------- §10 checks 4 and 5: unpruned MACs and
# params


@pytest.mark.parametrize(
    ("name", "macs"),
    [
        ("resnet20", 40_551_040),
        ("resnet32", 68_862_592),
        ("resnet56", 125_485_696),
        ("resnet110", 252_887_680),
    ],
)
def test_unpruned_resnet_macs(name: str, macs: int) -> None:
    assert _cifar_counts(name).macs == macs


def test_resnet56_chip_compat_baseline() -> None:
    assert _cifar_counts("resnet56", convention="chip").macs == 126_550_656


def test_unpruned_vgg_macs() -> None:
    counts = _cifar_counts("vgg16_bn_cifar")
    assert counts.conv_macs == 313_196_544
    assert counts.conv_macs + counts.conv_bias_adds + counts.linear_macs == 313_740_288
    assert counts.params_no_bn_affine == 14_982_474  # CHIP README "14.98M"


@pytest.mark.parametrize(
    ("name", "params", "params_no_bn"),
    [("resnet56", 853_018, 848_954), ("resnet110", 1_727_962, 1_719_866), ("resnet20", 269_722, None)],
)
def test_params(name: str, params: int, params_no_bn: int | None) -> None:
    counts = _cifar_counts(name)
    assert counts.params == params
    if params_no_bn is not None:
        assert counts.params_no_bn_affine == params_no_bn


def test_resnet110_param_exception_row() -> None:
    # §7.1: the one README row whose params match the count *with* BN affine (0.89M).
    counts = _cifar_counts("resnet110", "[0.]+[0.22]*2+[0.35]*18+[0.45]*36")
    assert (counts.params, counts.params_no_bn_affine) == (889_702, 883_838)


@pytest.mark.parametrize(
    ("sparsity", "params_m", "chip_b"),
    [
        (None, 25.56, 4.11),
        ("[0.]+[0.1]*3+[0.35]*16", 15.09, 2.26),
        ("[0.]+[0.25]*3+[0.5]*16", 11.05, 1.52),
        ("[0.]+[0.5]*3+[0.6]*16", 8.02, 0.95),
    ],
)
def test_resnet50_chip_readme_rows(sparsity: str | None, params_m: float, chip_b: float) -> None:
    """CHIP README ImageNet rows (§1.6): params with BN affine, FLOPs in the CHIP convention, at 224x224.

    (The base params 25,557,032 round to 25.56M; the README lists 25.55M.)
    """
    # Shapes are all the counter needs: build and run on the meta device, no weights, no arithmetic.
    with torch.device("meta"):
        counts = count(create("resnet50", sparsity=sparsity), torch.zeros(1, 3, 224, 224), convention="chip")
    assert round(counts.params / 1e6, 2) == params_m
    assert round(counts.macs / 1e9, 2) == chip_b


# ---------------------------------------------------------------- cross-check against torch's FlopCounterMode


class _FunctionalAndTransposed(nn.Module):
    """Functional conv + linear outside modules, a transposed conv, a grouped conv: all must be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
        self.head = nn.Parameter(torch.randn(5, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.weight, padding=1))
        x = self.grouped(self.up(x))
        return F.linear(x.mean(dim=(2, 3)), self.head)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet20", CIFAR_INPUT),
        ("resnet20b", CIFAR_INPUT),
        ("vgg16_bn_cifar", CIFAR_INPUT),
        ("densenet_cifar", CIFAR_INPUT),
        ("mobilenet_v2", (1, 3, 32, 32)),
        ("resnet50", (1, 3, 32, 32)),
    ],
)
def test_macs_match_flop_counter_mode(name: str, shape: tuple[int, ...]) -> None:
    model = create(name).eval()
    x = torch.randn(*shape)
    counts = count(model, x)
    with FlopCounterMode(display=False) as flop_counter, torch.no_grad():
        model(x)
    assert counts.conv_macs > 0 and counts.linear_macs > 0
    assert flop_counter.get_total_flops() == 2 * (counts.conv_macs + counts.linear_macs)


def test_functional_and_transposed_convs_counted() -> None:
    torch.manual_seed(0)
    model = _FunctionalAndTransposed()
    x = torch.randn(2, 3, 8, 8)
    counts = count(model, x)
    with FlopCounterMode(display=False) as flop_counter, torch.no_grad():
        model(x)
    # FlopCounterMode counts the whole batch of 2; the counter reports per image.
    assert flop_counter.get_total_flops() == 2 * 2 * (counts.conv_macs + counts.linear_macs)
    # Hand count, per image: conv 6*8*8 outputs x 27; transposed conv: 6*8*8 inputs x 4*9; grouped conv:
    # 8*16*16 outputs x (4/2)*9; linear 8*5.
    assert counts.conv_macs == 6 * 64 * 27 + 6 * 64 * 36 + 8 * 256 * 18
    assert counts.linear_macs == 40
    assert counts.conv_bias_adds == 4 * 16 * 16  # only the transposed conv has a bias
    paths = {layer.path for layer in counts.layers}
    assert {"<functional conv2d>", "<functional linear>", "up", "grouped"} <= paths


# ---------------------------------------------------------------- counter mechanics


def test_meta_device_counts_equal_real_counts() -> None:
    real = _cifar_counts("resnet20", "[0.25]*3+[0.5]*9")
    with torch.device("meta"):
        meta = count(create("resnet20", sparsity="[0.25]*3+[0.5]*9"), torch.zeros(*CIFAR_INPUT))
    assert meta == real


def test_hand_counted_layers_and_batch_division() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(200, 4)
    )
    one = count(model, torch.randn(1, 3, 5, 5))
    three = count(model, torch.randn(3, 3, 5, 5))
    assert one == three
    assert one.conv_macs == 8 * 25 * 27
    assert one.conv_bias_adds == 200
    assert one.bn_elements == 200
    assert one.linear_macs == 200 * 4
    assert one.params == 8 * 27 + 8 + 16 + 200 * 4 + 4
    assert one.params_no_bn_affine == one.params - 16
    conv = one.layers[0]
    assert (conv.path, conv.kind, conv.in_channels, conv.out_channels, conv.output_shape) == (
        "0",
        "conv",
        3,
        8,
        (8, 5, 5),
    )
    assert (conv.macs, conv.params) == (5400, 8 * 27 + 8)


def test_elementwise_ops_count_residual_additions() -> None:
    counts = _cifar_counts("resnet20")
    # One addition per BasicBlock, of the block output: 3 blocks per stage at 16x32x32, 32x16x16, 64x8x8.
    assert counts.elementwise_ops == 3 * (16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8)
    assert _cifar_counts("vgg16_bn_cifar").elementwise_ops == 0


def test_training_flags_restored() -> None:
    model = create("resnet20")
    model.train()
    model.layer2.eval()
    count(model, torch.randn(2, 3, 32, 32))
    assert model.training and model.layer1.training and model.linear.training
    assert not model.layer2.training and not model.layer2[0].bn1.training
    # eval mode during the count: BN running statistics were not updated.
    assert torch.equal(model.bn1.running_mean, torch.zeros(16))


def test_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1, bias=False)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * y

    counts = count(TwoInputs(), (torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)))
    assert counts.conv_macs == 4 * 16 * 3
    assert counts.elementwise_ops == 4 * 16


# ---------------------------------------------------------------- conventions (§10 check 6)


def test_unknown_convention_refused() -> None:
    with pytest.raises(ConfigError, match="unknown counting convention 'flops'"):
        count(create("small_cnn"), torch.randn(1, 1, 8, 8), convention="flops")


def test_convention_mixing_refused() -> None:
    base = _cifar_counts("resnet56", convention="chip")
    pruned_macs = _cifar_counts("resnet56", "[0.]+[0.15]*2+[0.4]*27", convention="macs")
    with pytest.raises(ConfigError, match="different conventions"):
        pruned_macs.reduction_vs(base)


def test_reduction_from_absolute_counts() -> None:
    base = _cifar_counts("resnet56")
    pruned = _cifar_counts("resnet56", "[0.]+[0.15]*2+[0.4]*27")
    reduction = pruned.reduction_vs(base)
    assert reduction["macs_reduction"] == pytest.approx(1 - 65_168_128 / 125_485_696)
    assert round(100 * reduction["macs_reduction"], 1) == 48.1  # §7.1: consistent conv+FC count, not 47.4
    assert reduction["speedup"] == pytest.approx(125_485_696 / 65_168_128)
    assert reduction["params_no_bn_affine_reduction"] == pytest.approx(1 - 482_321 / 848_954)
    assert pruned.to_dict()["macs"] == 65_168_128
