"""pare.config (typed, frozen, validated once, JSON round trip) and pare.pipeline.run (one orchestration path)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from pare.allocate import Budget
from pare.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    ModelConfig,
    PipelineConfig,
    PruneConfig,
    RepairConfig,
)
from pare.errors import BudgetError, ConfigError
from pare.pipeline import prepare, resolve_defaults, run, step_targets, with_seed
from pare.train import Recipe


def _config(**overrides: object) -> PipelineConfig:
    base = PipelineConfig(
        model=ModelConfig(name="small_cnn"),
        data=DataConfig(path="digits", val_fraction=0.15, calib_images=128, calib_batch_size=64),
        criterion="l1", target=Budget(macs_reduction=0.4), repair=RepairConfig(recalibrate=True),
        eval=EvalConfig(splits=("val", "test")),
    )
    return PipelineConfig(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, **overrides})


def test_config_round_trips_through_json() -> None:
    config = _config(finetune=FinetuneConfig(recipe=Recipe(epochs=2, milestones=(1,), schedule="step")),
                     criterion_options={"residual": "first"}, prune=PruneConfig(protected=("conv1",), steps=2))
    text = json.dumps(config.to_dict())
    again = PipelineConfig.from_dict(json.loads(text))
    assert again == config and again.to_dict() == config.to_dict()
    assert again.target == Budget(macs_reduction=0.4) and again.finetune.recipe.milestones == (1,)


def test_config_errors_are_one_line_naming_the_key() -> None:
    good = _config().to_dict()
    with pytest.raises(ConfigError, match=r"unknown key 'prune\.alocation'; did you mean allocation\?"):
        PipelineConfig.from_dict({**good, "prune": {"alocation": "uniform"}})
    with pytest.raises(ConfigError, match=r"prune\.allocation: unknown 'greedy'"):
        PipelineConfig.from_dict({**good, "prune": {"allocation": "greedy"}})
    with pytest.raises(ConfigError, match=r"data\.val_fraction: must be a fraction"):
        PipelineConfig.from_dict({**good, "data": {"path": "digits", "val_fraction": 10}})
    with pytest.raises(ConfigError, match="target"):
        PipelineConfig.from_dict({**good, "target": {"macs_reduction": 50}})
    with pytest.raises(ConfigError, match=r"eval\.splits: no split 'lossless932'"):
        PipelineConfig.from_dict({**good, "eval": {"splits": ["lossless932"]}})
    with pytest.raises(ConfigError, match=r"torch-pruning takes a macs_reduction target"):
        _config(prune=PruneConfig(engine="torch-pruning"), target=Budget(channel_ratio=0.3))
    with pytest.raises(ConfigError, match=r"repair\.recalibrate"):
        RepairConfig(recalibrate=1)  # type: ignore[arg-type]


def test_step_targets_compound_to_the_total() -> None:
    for kind in ("macs_reduction", "channel_ratio"):
        steps = step_targets(Budget(**{kind: 0.6}), 3)
        kept = math.prod(1.0 - float(b.value) for b in steps)
        assert kept == pytest.approx(0.4) and all(b.kind == kind for b in steps)
    assert step_targets(Budget(sparsity="[0.5]"), 3) == [Budget(sparsity="[0.5]")]
    with pytest.raises(BudgetError):
        Budget(macs_reduction=1.2)


def test_one_shot_and_iterative_runs() -> None:
    config = _config()
    loaded, data = prepare(config)
    before = [p.clone() for p in loaded.model.parameters()]
    one = run(config, model=loaded, data=data)
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))  # the dense model is kept
    assert abs(float(one.reduction["macs_reduction"]) - 0.4) <= 0.005
    assert set(one.accuracy) == {"dense", "pruned"} and set(one.accuracy["pruned"]) == {"val", "test"}
    # The record holds the configuration with every "auto" made explicit, so a replay needs no defaults.
    assert 0.0 <= one.top1("pruned") <= 1.0 and one.record()["config"] == resolve_defaults(config).to_dict()

    calls: list[int] = []
    recovery = FinetuneConfig(recipe=Recipe(epochs=1, batch_size=128, lr=0.01))
    iterative = run(_config(prune=PruneConfig(steps=3), recovery=recovery), model=loaded, data=data,
                    recover=lambda model, step: calls.append(step))
    assert calls == [0, 1] and len(iterative.prune) == 3
    assert abs(float(iterative.reduction["macs_reduction"]) - 0.4) <= 0.015  # each step within its tolerance
    with pytest.raises(ConfigError, match=r"set prune\.steps > 1"):
        _config(recovery=recovery)
    assert with_seed(config, 5).data.seed == 5 and with_seed(config, 5).prune.seed == 5


@pytest.mark.skipif(importlib.util.find_spec("pare.baselines") is None
                    or importlib.util.find_spec("pare.baselines.torch_pruning") is None
                    or importlib.util.find_spec("torch_pruning") is None,
                    reason="pare.baselines.torch_pruning (the lead's module) or torch_pruning is absent")
def test_torch_pruning_engine_gets_the_same_repair() -> None:
    # small_cnn's narrow layers give Torch-Pruning's per-layer ratio coarse MACs steps: a wider tolerance
    config = _config(prune=PruneConfig(engine="torch-pruning", allocation="uniform", internal_only=True,
                                       tolerance=0.05),
                     repair=RepairConfig(recalibrate=True, compensate=True))
    result = run(config)
    assert result.prune[-1].criterion == "torch-pruning:l1" and "compensate" in result.prune[-1].seconds
    assert 0.3 <= float(result.reduction["macs_reduction"]) <= 0.5
