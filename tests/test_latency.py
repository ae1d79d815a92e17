"""Measured latency (API, not timings) and latency targets with an injected, deterministic latency model.

No assertion here depends on how fast the machine is: real timings are only checked for shape and sanity
(positive, ordered quartiles); the search is tested with ``measure=`` latency models computed from MACs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from torch import nn

from pare.allocate import Budget
from pare.config import PruneConfig
from pare.count import count
from pare.errors import BudgetError, ConfigError
from pare.latency import Latency, compare_latency, measure_latency
from pare.models import create
from pare.prune import prune
from pare.prune_latency import max_macs_reduction, prune_to_latency

X32 = torch.zeros(1, 3, 32, 32)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return create("resnet20").eval()


def _macs_latency(overhead_ms: float) -> Callable[[nn.Module], float]:
    """A deterministic latency model: a fixed per-call overhead plus 1 ms per million MACs (batch of X32)."""

    def measure(model: nn.Module) -> float:
        return overhead_ms + count(model, X32).macs / 1e6

    return measure


# -- measure_latency / compare_latency ----------------------------------------------------------------------


def test_measure_latency_fields_and_restored_state() -> None:
    model = _tiny().train()
    before_threads = torch.get_num_threads()
    lat = measure_latency(model, torch.randn(4, 3, 8, 8), runs=5, warmup=1, threads=1)
    assert isinstance(lat, Latency)
    assert lat.runs == 5 and lat.warmup == 1 and lat.batch_size == 4 and lat.threads == 1
    assert lat.backend == "eager" and lat.device == "cpu"
    assert 0 < lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms
    assert lat.iqr_ms >= 0
    d = lat.to_dict()
    assert d["iqr_ms"] == pytest.approx(lat.q3_ms - lat.q1_ms)
    assert {"median_ms", "q1_ms", "q3_ms", "min_ms", "batch_size", "threads", "backend"} <= set(d)
    # The thread setting and the training flag are the caller's again afterwards.
    assert torch.get_num_threads() == before_threads
    assert model.training


def test_measure_latency_single_run_and_tuple_inputs() -> None:
    lat = measure_latency(_tiny().eval(), (torch.randn(2, 3, 8, 8),), runs=1, warmup=0)
    assert lat.runs == 1 and lat.batch_size == 2
    assert lat.q1_ms == lat.median_ms == lat.q3_ms and lat.iqr_ms == 0


def test_measure_latency_errors() -> None:
    model, x = _tiny(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match="unknown latency backend"):
        measure_latency(model, x, backend="tensorrt")
    with pytest.raises(ConfigError, match="runs must be"):
        measure_latency(model, x, runs=0)
    with pytest.raises(ConfigError, match="warmup"):
        measure_latency(model, x, warmup=-1)
    with pytest.raises(ConfigError, match="threads must be"):
        measure_latency(model, x, runs=1, threads=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            measure_latency(model, x, device="cuda")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_measure_latency_onnxruntime() -> None:
    model = _tiny().train()
    lat = measure_latency(model, torch.randn(2, 3, 8, 8), backend="onnxruntime", runs=3, warmup=1, threads=1)
    assert lat.backend == "onnxruntime" and lat.device == "cpu" and lat.batch_size == 2 and lat.threads == 1
    assert 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms
    assert model.training


def test_compare_latency_pools_rounds() -> None:
    models = {"a": _tiny(), "b": _tiny()}
    res = compare_latency(models, torch.randn(1, 3, 8, 8), rounds=3, runs=6, warmup=1, threads=1)
    assert set(res) == {"a", "b"}
    for lat in res.values():
        assert lat.runs == 6 and lat.batch_size == 1 and lat.threads == 1
        assert lat.q1_ms <= lat.median_ms <= lat.q3_ms and lat.iqr_ms >= 0
    with pytest.raises(ConfigError, match="rounds"):
        compare_latency(models, torch.randn(1, 3, 8, 8), rounds=0)
    with pytest.raises(ConfigError, match="unknown compare_latency option"):
        compare_latency(models, torch.randn(1, 3, 8, 8), repeats=3)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_compare_latency_onnxruntime() -> None:
    res = compare_latency({"a": _tiny(), "b": _tiny()}, torch.randn(1, 3, 8, 8), rounds=2, runs=2, warmup=0,
                          backend="onnxruntime", threads=1)
    assert all(lat.backend == "onnxruntime" and lat.runs == 2 for lat in res.values())


# -- prune_to_latency -----------------------------------------------------------------------------------------


def test_prune_to_latency_proportional_to_macs_hits_target() -> None:
    model = _resnet20()
    res = prune_to_latency(model, X32, reduction=0.4, measure=_macs_latency(0.0), tolerance=0.02,
                           config=PruneConfig(verify=False))
    lat = res.latency
    assert lat is not None
    assert lat["target"] == 0.4 and lat["backend"] == "custom" and lat["within_tolerance"]
    assert abs(lat["measured_reduction"] - 0.4) <= 0.02
    # The reported figures are measurements of the returned model, not of a search estimate.
    assert lat["after"]["median_ms"] == pytest.approx(count(res.model, X32).macs / 1e6)
    assert lat["before"]["median_ms"] == pytest.approx(count(model, X32).macs / 1e6)
    assert lat["measured_reduction"] == pytest.approx(1 - lat["after"]["median_ms"] / lat["before"]["median_ms"])
    assert len(lat["searched"]) >= 1 and all(len(s) == 2 for s in lat["searched"])
    assert res.criterion == "l1"


def test_prune_to_latency_searches_past_a_fixed_overhead() -> None:
    # 10 ms of overhead on ~41 ms of MACs: latency falls slower than MACs, so the first guess (m = target) is
    # too slow and the search must extrapolate, then bracket.
    model = _resnet20()
    measure = _macs_latency(10.0)
    res = prune_to_latency(model, X32, reduction=0.4, measure=measure, tolerance=0.01, config=PruneConfig(verify=False))
    lat = res.latency
    assert lat is not None and len(lat["searched"]) >= 2
    assert abs(lat["measured_reduction"] - 0.4) <= 0.01
    assert res.macs_reduction > 0.45  # more MACs had to go than the latency target
    first_ms = lat["searched"][0][1]
    assert 1 - first_ms / lat["before"]["median_ms"] < 0.39


def test_prune_to_latency_unreachable_target() -> None:
    model = _resnet20()
    # With 100 ms of overhead the largest pruning cannot remove 60% of the time.
    with pytest.raises(BudgetError, match=r"cannot cut latency by 60\.0%"):
        prune_to_latency(model, X32, reduction=0.6, measure=_macs_latency(100.0), config=PruneConfig(verify=False))
    # Reachable, but not in one step: the first guess (latency proportional to MACs) is too slow.
    with pytest.raises(BudgetError, match="within 1 steps"):
        prune_to_latency(model, X32, reduction=0.4, measure=_macs_latency(10.0), max_steps=1,
                         config=PruneConfig(verify=False))


def test_prune_to_latency_real_timing_path() -> None:
    # A zero target returns the first (unpruned) candidate whatever the timings, so this exercises the real
    # measurement path without depending on how fast or loaded the machine is.
    res = prune_to_latency(_resnet20(), X32, reduction=0.0, runs=2, warmup=0, rounds=1, threads=1,
                           config=PruneConfig(verify=False))
    lat = res.latency
    assert lat is not None and lat["backend"] == "eager" and len(lat["searched"]) == 1
    for key in ("before", "after"):
        assert lat[key]["median_ms"] > 0 and lat[key]["iqr_ms"] >= 0 and lat[key]["runs"] == 4
    assert lat["measured_reduction"] == pytest.approx(1 - lat["after"]["median_ms"] / lat["before"]["median_ms"])


def test_prune_to_latency_zero_target_and_bad_arguments() -> None:
    model = _resnet20()
    res = prune_to_latency(model, X32, reduction=0.0, measure=_macs_latency(0.0), config=PruneConfig(verify=False))
    assert res.latency is not None and res.macs_reduction == pytest.approx(0.0, abs=0.005)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="reduction"):
            prune_to_latency(model, X32, reduction=bad, measure=_macs_latency(0.0))
    with pytest.raises(ConfigError, match="backend"):
        prune_to_latency(model, X32, reduction=0.3, backend="tvm")
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune_to_latency(model, X32, reduction=0.3, criterion="chip", measure=_macs_latency(0.0))


def test_prune_to_latency_respects_constraints() -> None:
    model = _resnet20()
    cap = max_macs_reduction(model, X32, PruneConfig(round_to=8, min_channels=8))
    assert 0.5 < cap < 1.0
    assert cap < max_macs_reduction(model, X32)
    res = prune_to_latency(model, X32, reduction=0.3, measure=_macs_latency(0.0),
                           config=PruneConfig(round_to=8, min_channels=8, allocation="uniform", verify=False))
    assert res.macs_reduction > 0.2
    for name, m in res.model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels % 8 == 0, name
            assert m.in_channels == 3 or m.in_channels % 8 == 0, name


@pytest.mark.parametrize(("allocation", "round_to"), [("global", 8), ("uniform", 16)])
@pytest.mark.parametrize("name", ["resnet20", "resnet20b"])
def test_round_to_gives_multiples_in_every_pruned_group(name: str, allocation: str, round_to: int) -> None:
    """Every pruned group of at least ``2 * round_to`` channels keeps a multiple of ``round_to`` (smaller groups
    are documented to stay unrounded), checked on the plan and on the physical widths after surgery."""
    torch.manual_seed(0)
    model = create(name).eval()
    res = prune(model, X32, target=Budget(macs_reduction=0.5),
                config=PruneConfig(round_to=round_to, allocation=allocation, verify=False))
    rounded = [g for g in res.groups if g["removed"] and g["size"] >= 2 * round_to]
    assert rounded, "nothing was pruned"
    for g in rounded:
        assert (g["size"] - g["removed"]) % round_to == 0, g
    if name == "resnet20":
        # Option-A shortcuts split a stage's first conv2 output into several groups (zero-padded slices of 8
        # channels here), so rounding per group does not round that conv's width: nothing more to check.
        return
    dense = dict(model.named_modules())
    for path, m in res.model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        width = dense[path].out_channels
        if m.out_channels != width and width >= 2 * round_to:
            assert m.out_channels % round_to == 0, (path, m.out_channels)
