"""Recipes, the LR schedule (methods.md §1.3 item 5, §10 check 12) and fit() on tiny synthetic data."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pare.errors import ConfigError, PareError
from pare.evaluate import evaluate
from pare.train import (
    RECIPES,
    Recipe,
    TrainingDivergedError,
    build_optimizer,
    fit,
    get_recipe,
    lr_at,
)
from pare.train.distributed import DistContext
from pare.train.hooks import Hook
from pare.train.step import task_loss_of
from pare.train.trainer import _show_progress

# -------------------- fixtures


def make_data(n: int, seed: int) -> TensorDataset:
    """n images (n, 3, 8, 8) with labels (n,) from a linearly separable rule, so tiny models can learn it."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    labels = (images[:, 0].mean(dim=(1, 2)) > images[:, 1].mean(dim=(1, 2))).long()
    return TensorDataset(images, labels)


def make_model(seed: int = 0, batchnorm: bool = True, dropout: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Dropout(0.1 if dropout else 0.0), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(8, 2))
    return nn.Sequential(*layers)


def loaders(batch: int = 16, shuffle_val: bool = False) -> tuple[DataLoader, DataLoader, DataLoader]:
    train = DataLoader(make_data(96, 1), batch_size=batch, shuffle=True)
    val = DataLoader(make_data(48, 2), batch_size=32, shuffle=shuffle_val)
    test = DataLoader(make_data(48, 3), batch_size=32)
    return train, val, test


def small_recipe(**kw: Any) -> Recipe:
    base = dict(name="test", epochs=3, batch_size=16, lr=0.05, schedule="cosine", weight_decay=1e-4)
    base.update(kw)
    return Recipe(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -------------------- recipes


def test_presets_match_spec_table() -> None:
    assert set(RECIPES) == {"cifar-standard", "li2017", "hrankplus", "chip", "torchpruning"}
    chip = get_recipe("chip")
    assert (chip.epochs, chip.batch_size, chip.lr, chip.momentum, chip.weight_decay) == (
        400,
        256,
        0.01,
        0.9,
        5e-3,
    )
    assert (chip.schedule, chip.warmup_epochs) == ("chip", 5)
    li = get_recipe("li2017")
    assert (li.epochs, li.lr, li.schedule) == (40, 1e-3, "constant")
    hp = get_recipe("hrankplus")
    assert (hp.epochs, hp.batch_size, hp.milestones) == (150, 256, (50, 100))
    tp = get_recipe("torchpruning")
    assert (tp.epochs, tp.lr, tp.milestones, tp.gamma) == (100, 0.01, (60, 80), 0.1)
    cs = get_recipe("cifar-standard")
    assert (cs.epochs, cs.batch_size, cs.lr, cs.weight_decay, cs.schedule) == (200, 128, 0.1, 5e-4, "cosine")


def test_get_recipe_unknown_lists_names_and_overrides_apply() -> None:
    with pytest.raises(ConfigError, match=r"chip.*cifar-standard|cifar-standard.*chip"):
        get_recipe("nope")
    short = get_recipe("chip", epochs=10, seed=3)
    assert (short.epochs, short.seed, short.weight_decay) == (10, 3, 5e-3)
    assert get_recipe("chip").epochs == 400  # presets are not mutated
    with pytest.raises(ConfigError, match="unknown recipe field"):
        get_recipe("chip").replace(learning_rate=0.1)
    with pytest.raises(AttributeError):
        short.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"lr": -1.0},
        {"lr": float("nan")},
        {"momentum": 1.0},
        {"nesterov": True, "momentum": 0.0},
        {"schedule": "linear"},
        {"milestones": (80, 60)},
        {"label_smoothing": 1.0},
        {"grad_clip_norm": 0.0},
        {"distill_alpha": 1.5},
        {"schedule": "chip", "epochs": 5, "warmup_epochs": 5},
    ],
)
def test_invalid_recipe_values_raise_config_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Recipe(**bad)


def test_recipe_dict_round_trip() -> None:
    recipe = get_recipe("hrankplus", seed=7, grad_clip_norm=5.0)
    data = recipe.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Recipe.from_dict(data) == recipe


# -------------------- LR schedule


@pytest.mark.parametrize("steps_per_epoch", [1, 7, 196])
def test_chip_schedule_check_12(steps_per_epoch: int) -> None:
    recipe = get_recipe("chip")  # lr0 = 0.01, epochs = 400
    lr0, length = 0.01, steps_per_epoch
    assert lr_at(recipe, 5, 0, length) == pytest.approx(lr0, rel=1e-15)
    expected_first = 0.5 * lr0 * (1 + math.cos(-5 * math.pi / 395)) * 1 / (5 * length)
    assert lr_at(recipe, 0, 0, length) == pytest.approx(expected_first, rel=1e-15)
    after_warmup = [lr_at(recipe, e, s, length) for e in range(5, 400) for s in range(min(length, 3))]
    assert all(b <= a for a, b in itertools.pairwise(after_warmup))
    # The official code's warm-up multiplier: (1 + step + epoch·L) / (5·L), on the integer-epoch cosine.
    epoch, step = 3, length - 1
    cosine = 0.5 * lr0 * (1 + math.cos(math.pi * (epoch - 5) / 395))
    assert lr_at(recipe, epoch, step, length) == pytest.approx(
        cosine * (1 + step + epoch * length) / (5 * length)
    )


def test_step_constant_cosine_schedules() -> None:
    step = Recipe(epochs=100, lr=0.01, schedule="step", milestones=(60, 80), gamma=0.1)
    assert lr_at(step, 59, 9, 10) == pytest.approx(0.01)
    assert lr_at(step, 60, 0, 10) == pytest.approx(0.001)
    assert lr_at(step, 80, 0, 10) == pytest.approx(0.0001)
    const = Recipe(epochs=40, lr=1e-3, schedule="constant")
    assert {lr_at(const, e, s, 5) for e in range(40) for s in range(5)} == {1e-3}
    cos = Recipe(epochs=10, lr=0.1, schedule="cosine")
    assert lr_at(cos, 0, 0, 4) == pytest.approx(0.1)
    assert lr_at(cos, 5, 0, 4) == pytest.approx(0.05)
    assert lr_at(cos, 9, 3, 4) == pytest.approx(0.5 * 0.1 * (1 + math.cos(math.pi * 39 / 40)))
    warm = Recipe(epochs=10, lr=0.1, schedule="constant", warmup_epochs=2)
    assert [lr_at(warm, 0, s, 4) for s in range(4)] == pytest.approx([0.0125, 0.025, 0.0375, 0.05])
    assert lr_at(warm, 1, 3, 4) == pytest.approx(0.1)
    assert lr_at(warm, 2, 0, 4) == pytest.approx(0.1)


def test_lr_at_rejects_out_of_range() -> None:
    recipe = Recipe(epochs=3)
    for args in [(3, 0, 4), (-1, 0, 4), (0, 4, 4), (0, 0, 0)]:
        with pytest.raises(ConfigError):
            lr_at(recipe, *args)


# -------------------- losses, optimizer


def test_task_loss_label_smoothing_and_distillation_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0])
    recipe = Recipe(label_smoothing=0.1, distill_alpha=0.3, distill_temperature=2.0)
    hard = F.cross_entropy(student, labels, label_smoothing=0.1)
    p_teacher = F.softmax(teacher / 2.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 2.0, dim=1))).sum(dim=1).mean()
    expected = 0.7 * hard + 0.3 * 4.0 * kl
    assert task_loss_of(student, labels, teacher, recipe).item() == pytest.approx(expected.item(), rel=1e-6)
    assert task_loss_of(student, labels, None, recipe).item() == pytest.approx(hard.item(), rel=1e-6)


def test_no_decay_bn_bias_groups() -> None:
    model = make_model()
    groups = build_optimizer(model, Recipe(no_decay_bn_bias=True, weight_decay=1e-3)).param_groups
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    assert all(p.dim() > 1 for p in groups[0]["params"]) and all(p.dim() <= 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    single = build_optimizer(model, Recipe(weight_decay=1e-3)).param_groups
    assert len(single) == 1 and single[0]["weight_decay"] == 1e-3


# -------------------- fit


def test_fit_learns_logs_and_selects_on_val_only(tmp_path: Path) -> None:
    train, val, test = loaders()
    model = make_model()
    result = fit(model, train, val, small_recipe(epochs=8, lr=0.2), test_loader=test, out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(8))
    assert set(rows[0]) >= {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    assert rows == result.history
    val_accs = [r["val_acc"] for r in rows]
    assert result.best_val_epoch == val_accs.index(max(val_accs))
    assert result.best_val_acc == max(val_accs)
    assert result.final_val_acc == val_accs[-1] > 0.8  # the rule is learnable
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # Reported test accuracy is the final-epoch model's, computed once at the end.
    assert result.test_acc == pytest.approx(evaluate(model, test)["top1"])
    assert result.test_acc_best_val is None
    assert (tmp_path / "checkpoint.pt").is_file()


def test_keep_best_restores_best_val_weights() -> None:
    train, val, test = loaders()
    model = make_model()
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snapshot(Hook):
        def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
            if epoch > 0:
                snapshots.append(weights(model))

    recipe = small_recipe(epochs=4, lr=0.2)
    result = fit(model, train, val, recipe, test_loader=test, keep_best=True, hooks=[Snapshot()])
    # Snapshot i is the state after epoch i (0-based); the model must now hold the best-on-val one.
    if result.best_val_epoch < len(snapshots):
        best = snapshots[result.best_val_epoch]
        assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    assert evaluate(model, val)["top1"] == pytest.approx(result.best_val_acc)
    assert result.test_acc_best_val == pytest.approx(evaluate(model, test)["top1"])


def test_hooks_are_called_with_current_lr_and_can_regularise() -> None:
    train, val, _ = loaders()
    calls: dict[str, list[Any]] = {"epoch": [], "lr": [], "grad": []}
    recipe = small_recipe(epochs=2, schedule="chip", warmup_epochs=1)

    class Recorder(Hook):
        def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
            calls["epoch"].append(epoch)

        def on_loss(self, model: nn.Module, loss: torch.Tensor, batch: Any) -> torch.Tensor:
            images, labels = batch
            assert images.shape[0] == labels.shape[0]
            return loss + 0.2 * model[0].weight.pow(2).sum()  # strong L2 on the first conv

        def after_backward(self, model: nn.Module) -> None:
            calls["grad"].append(model[0].weight.grad is not None)

        def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
            calls["lr"].append((lr, optimizer.param_groups[0]["lr"]))

    plain, regularised = make_model(), make_model()
    fit(plain, train, val, recipe)
    fit(regularised, train, val, recipe, hooks=[Recorder()])
    steps = len(train)
    assert calls["epoch"] == [0, 1]
    assert all(calls["grad"]) and len(calls["grad"]) == 2 * steps
    expected = [lr_at(recipe, e, s, steps) for e in range(2) for s in range(steps)]
    assert [a for a, _ in calls["lr"]] == pytest.approx(expected)
    assert all(a == b for a, b in calls["lr"])
    assert regularised[0].weight.norm() < 0.5 * plain[0].weight.norm()


def test_grad_clip_bounds_the_update() -> None:
    train, val, _ = loaders()
    model = make_model(batchnorm=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    recipe = small_recipe(
        epochs=1, schedule="constant", lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip_norm=1e-4
    )
    fit(model, train, val, recipe)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # Each of the len(train) steps moves the parameters by at most lr · clip.
    assert (after - before).norm().item() <= len(train) * 0.1 * 1e-4 * (1 + 1e-4)
    assert (after - before).norm().item() > 0


def test_distillation_uses_teacher_and_leaves_it_unchanged() -> None:
    train, val, _ = loaders()
    teacher = make_model(seed=5)
    teacher_before = weights(teacher)
    student_a, student_b = make_model(), make_model()
    fit(student_a, train, val, small_recipe(epochs=1))
    fit(student_b, train, val, small_recipe(epochs=1, distill_alpha=0.9), teacher=teacher)
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(student_a[0].weight, student_b[0].weight)


def test_evaluation_and_outside_rng_do_not_change_training() -> None:
    """Data order depends only on (seed, epoch); evaluating never perturbs the training RNG streams."""
    train, val, _ = loaders()
    _, shuffled_val, _ = loaders(shuffle_val=True)
    a, b, c = make_model(), make_model(), make_model()
    fit(a, train, val, small_recipe())
    torch.rand(1000)  # consume global RNG between runs: fit reseeds, so nothing changes
    fit(b, train, shuffled_val, small_recipe())
    fit(c, train, val, small_recipe(seed=1))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a[0].weight, c[0].weight)


def test_amp_is_a_noop_on_cpu_and_channels_last_matches() -> None:
    train, val, _ = loaders()
    # No dropout: its random mask is drawn in memory order, which channels-last changes.
    plain, amp, cl = make_model(dropout=False), make_model(dropout=False), make_model(dropout=False)
    fit(plain, train, val, small_recipe(epochs=1))
    fit(amp, train, val, small_recipe(epochs=1, amp=True))
    fit(cl, train, val, small_recipe(epochs=1, channels_last=True))
    assert all(torch.equal(v, amp.state_dict()[k]) for k, v in plain.state_dict().items())
    for k, v in plain.state_dict().items():
        assert torch.allclose(v.float(), cl.state_dict()[k].float(), atol=1e-5), k


def test_custom_reiterable_loader_with_set_epoch() -> None:
    data = make_data(64, 4)

    class EpochLoader:
        """Re-iterable with __len__ and set_epoch: a permutation seeded by the epoch."""

        def __init__(self) -> None:
            self.epochs_seen: list[int] = []
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epochs_seen.append(epoch)
            self.epoch = epoch

        def __len__(self) -> int:
            return 4

        def __iter__(self) -> Any:
            order = torch.randperm(64, generator=torch.Generator().manual_seed(self.epoch))
            for i in range(4):
                idx = order[i * 16 : (i + 1) * 16]
                yield data.tensors[0][idx], data.tensors[1][idx]

    loader = EpochLoader()
    result = fit(make_model(), loader, [(data.tensors[0], data.tensors[1])], small_recipe(epochs=3))
    assert loader.epochs_seen == [0, 1, 2]
    assert result.epochs_completed == 3


def test_hooks_are_typed_and_fit_leaves_the_global_rng_alone() -> None:
    train, val, _ = loaders()

    class Misspelt:  # not a Hook: after_stpe would never be called
        def after_stpe(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None: ...

    with pytest.raises(ConfigError, match=r"Misspelt does not implement pare\.train\.TrainHook"):
        fit(make_model(), train, val, small_recipe(epochs=1), hooks=[Misspelt()])
    model = make_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, train, val, small_recipe(epochs=1))
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues where it was


def test_bad_inputs_raise_pare_errors() -> None:
    train, val, _ = loaders()
    with pytest.raises(ConfigError, match="batch must be"):
        fit(make_model(), [torch.zeros(2, 3, 8, 8)], val, small_recipe(epochs=1))
    with pytest.raises(ConfigError, match="empty"):
        fit(make_model(), [], val, small_recipe(epochs=1))
    with pytest.raises(ConfigError, match="recipe"):
        fit(make_model(), train, val, {"lr": 0.1})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        fit(make_model(), train, val, small_recipe(), checkpoint_every_steps=-1)
    with pytest.raises(ConfigError, match="device"):
        fit(make_model(), train, val, small_recipe(), device="tpu:0")

    class Explode(Hook):
        def on_loss(self, model: nn.Module, loss: torch.Tensor, batch: Any) -> torch.Tensor:
            return loss * float("nan")

    with pytest.raises(TrainingDivergedError, match="non-finite"):
        fit(make_model(), train, val, small_recipe(epochs=1), hooks=[Explode()])
    assert issubclass(TrainingDivergedError, PareError)


def test_progress_disabled_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    main = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    other = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    monkeypatch.setenv("CI", "1")
    assert _show_progress(None, main) is False
    assert _show_progress(True, main) is True
    assert _show_progress(True, other) is False
    assert _show_progress(False, main) is False


def test_teacher_copy_gives_zero_soft_loss() -> None:
    model = make_model()
    teacher = copy.deepcopy(model).eval()
    images = make_data(8, 9).tensors[0]
    with torch.no_grad():
        logits = teacher(images)
    recipe = Recipe(distill_alpha=1.0, distill_temperature=3.0)
    assert task_loss_of(logits, torch.zeros(8, dtype=torch.long), logits, recipe).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_on_epoch_end_runs_after_training_and_before_validation() -> None:
    train, val, _ = loaders()
    calls: list[tuple[str, int]] = []

    class ZeroHead(Hook):
        def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
            calls.append(("start", epoch))

        def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
            if not calls or calls[-1][0] != "step":
                calls.append(("step", -1))

        def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
            calls.append(("end", epoch))
            with torch.no_grad():  # constant logits: validation must see exactly log(2) loss
                model[-1].weight.zero_()
                model[-1].bias.zero_()

    result = fit(make_model(), train, val, small_recipe(epochs=2, lr=0.2), hooks=[ZeroHead()])
    assert calls == [("start", 0), ("step", -1), ("end", 0), ("start", 1), ("step", -1), ("end", 1)]
    assert all(h["val_loss"] == pytest.approx(math.log(2)) for h in result.history)
