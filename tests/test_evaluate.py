"""evaluate() and recalibrate_bn(): hand-checked accuracy and loss, exact BN statistics, real CIFAR-10."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pare.errors import ConfigError, DataError
from pare.evaluate import evaluate, recalibrate_bn
from pare.io import load_checkpoint
from tests.conftest import shared_path

# Logits of 5 samples over 6 classes; sample i's input is the index i.
_LOGITS = torch.tensor(
    [
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 0: rank 1
        [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 4: rank 5
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 5: rank 1
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # label 0: rank 6 (miss for top-5)
        [1.0, 9.0, 2.0, 8.0, 3.0, 7.0],  # label 3: rank 2
    ]
)
_LABELS = torch.tensor([0, 4, 5, 0, 3])


class _TableModel(nn.Module):
    """Returns the fixed logits row selected by each input index; x (N, 1) float -> (N, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(_LOGITS.clone())
        self.dropout = nn.Dropout(0.9)
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.dropout(self.table[x[:, 0].long()])


def _batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    index = torch.arange(5, dtype=torch.float32)[:, None]
    return [(index[i : i + batch_size], _LABELS[i : i + batch_size]) for i in range(0, 5, batch_size)]


def test_evaluate_hand_checked() -> None:
    model = _TableModel().train()
    result = evaluate(model, _batches(2), topk=(1, 2, 5))

    assert result["n"] == 5
    assert result["top1"] == pytest.approx(0.40)  # samples 0 and 2
    assert result["top2"] == pytest.approx(0.60)  # + sample 4
    assert result["top5"] == pytest.approx(0.80)  # + sample 1; sample 3 is ranked last
    expected_loss = (
        sum(
            math.log(sum(math.exp(v) for v in row)) - row[label]
            for row, label in zip(_LOGITS.tolist(), _LABELS.tolist())
        )
        / 5
    )
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert model.seen_training == [False, False, False]  # eval mode, so dropout did not scramble the logits
    assert model.training and model.dropout.training  # flags restored


def test_evaluate_batching_does_not_matter_and_k_is_capped() -> None:
    one = evaluate(_TableModel(), _batches(5), topk=(1, 10))
    many = evaluate(_TableModel(), _batches(1), topk=(1, 10))
    assert one == pytest.approx(many)
    assert one["top10"] == pytest.approx(1.0)  # k beyond the 6 classes counts every sample


def test_evaluate_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="no samples"):
        evaluate(_TableModel(), [])
    with pytest.raises(DataError, match="do not match"):
        evaluate(_TableModel(), [(torch.zeros(2, 1), torch.zeros(3, dtype=torch.long))])
    with pytest.raises(DataError, match="labels outside"):
        evaluate(_TableModel(), [(torch.zeros(2, 1), torch.tensor([0, 6]))])
    with pytest.raises(DataError, match="needs labels"):
        evaluate(_TableModel(), [torch.zeros(2, 1)])
    with pytest.raises(ConfigError, match="topk"):
        evaluate(_TableModel(), _batches(2), topk=(0,))


def _bn_data(batches: int, batch_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch_size, 3, 4, 5, generator=generator) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
        + 3.0
        for _ in range(batches)
    ]


def test_recalibrate_single_batch_gives_exact_statistics() -> None:
    (data,) = _bn_data(1, 64)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn.running_mean.fill_(-7.0)  # stale statistics that must be replaced, not blended
    model = nn.Sequential(bn).eval()

    recalibrate_bn(model, [data], batches=10)

    flat = data.double().permute(1, 0, 2, 3).reshape(3, -1)
    torch.testing.assert_close(bn.running_mean.double(), flat.mean(dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_var.double(), flat.var(dim=1, unbiased=True), atol=1e-5, rtol=0)
    assert bn.momentum == 0.3 and not bn.training and int(bn.num_batches_tracked) == 1


def test_recalibrate_is_a_cumulative_average_over_batches() -> None:
    data = _bn_data(4, 16)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn)

    recalibrate_bn(model, ((x, torch.zeros(len(x))) for x in data), batches=4)

    per_batch = [x.double().permute(1, 0, 2, 3).reshape(3, -1) for x in data]
    mean = torch.stack([b.mean(dim=1) for b in per_batch]).mean(dim=0)
    var = torch.stack([b.var(dim=1, unbiased=True) for b in per_batch]).mean(dim=0)
    torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=0)
    assert bn.momentum == 0.1 and bn.training  # restored: the model was in train mode


def test_recalibrate_uses_at_most_n_batches_and_keeps_dropout_in_eval() -> None:
    fetched = []

    def loader() -> Iterator[torch.Tensor]:
        for i, x in enumerate(_bn_data(10, 8)):
            fetched.append(i)
            yield x

    dropout_modes: list[bool] = []
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1)).train()
    model[0].register_forward_hook(lambda module, inputs, output: dropout_modes.append(module.training))
    recalibrate_bn(model, loader(), batches=3)

    assert fetched == [0, 1, 2]
    assert int(model[1].num_batches_tracked) == 3
    assert dropout_modes == [False, False, False]
    assert all(m.training for m in model.modules())


def test_recalibrate_empty_loader_leaves_statistics() -> None:
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(2.0)
    with pytest.raises(DataError, match="no batches"):
        recalibrate_bn(nn.Sequential(bn), [])
    assert torch.equal(bn.running_mean, torch.full((3,), 2.0)) and bn.momentum == 0.1
    with pytest.raises(ConfigError, match="batches"):
        recalibrate_bn(nn.Sequential(bn), [torch.zeros(1, 3, 1, 1)], batches=0)


@pytest.mark.shared
def test_akamaster_resnet20_on_lossless_cifar10() -> None:
    weights = shared_path("weights", "akamaster_resnet20-12fca82f.th")
    npz = shared_path("data", "cifar10_official_truncated", "cifar10_lossless_subset.npz")
    models = pytest.importorskip("pare.models")
    model = models.create("resnet20", num_classes=10)
    load_checkpoint(model, weights)
    with np.load(npz) as data:
        images = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2).float() / 255.0  # (932, 3, 32, 32)
        labels = torch.from_numpy(data["y_test"][: len(images)].astype(np.int64))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    images = (images - mean) / std
    loader = [(images[i : i + 256], labels[i : i + 256]) for i in range(0, len(images), 256)]

    result = evaluate(model, loader)

    assert result["n"] == 932
    assert result["top1"] == pytest.approx(0.9163, abs=0.005)
    assert result["top5"] > result["top1"]


# -------------------- options used by the trainer (soft targets, channels_last, all-reduce over ranks)


def test_evaluate_soft_targets_match_class_indices() -> None:
    hard = evaluate(_TableModel(), _batches(2), topk=(1, 5))
    one_hot = [(x, nn.functional.one_hot(y, 6).float()) for x, y in _batches(2)]
    soft = evaluate(_TableModel(), one_hot, topk=(1, 5))
    assert soft["top1"] == hard["top1"] and soft["top5"] == hard["top5"] and soft["n"] == 5
    assert soft["loss"] == pytest.approx(hard["loss"], rel=1e-6)
    # A genuinely soft target: loss is -sum(t * log_softmax) averaged over samples.
    targets = torch.full((5, 6), 1 / 6)
    expected = float(-(targets * _LOGITS.log_softmax(dim=1)).sum(dim=1).mean())
    uniform = evaluate(_TableModel(), [(torch.arange(5.0)[:, None], targets)], topk=(1,))
    assert uniform["loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(DataError, match="soft targets"):
        evaluate(_TableModel(), [(torch.arange(5.0)[:, None], torch.zeros(5, 4))])


def test_evaluate_channels_last_gives_the_same_metrics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    data = [(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    plain = evaluate(model, data, topk=(1,))
    last = evaluate(model, data, topk=(1,), channels_last=True)
    assert plain["top1"] == last["top1"] and last["loss"] == pytest.approx(plain["loss"], rel=1e-5)


def _all_reduce_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        index = torch.arange(5, dtype=torch.float32)[:, None]
        mine = [(index[rank::world], _LABELS[rank::world])]  # disjoint shards, unequal sizes (3 and 2)
        local = evaluate(_TableModel(), mine, topk=(1, 5))
        merged = evaluate(_TableModel(), mine, topk=(1, 5), all_reduce=True)
        torch.save({"local": local, "merged": merged}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_evaluate_all_reduce_sums_disjoint_shards(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    whole = evaluate(_TableModel(), _batches(5), topk=(1, 5))
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for result in results:
        assert result["merged"]["n"] == 5
        assert result["merged"]["top1"] == pytest.approx(whole["top1"])
        assert result["merged"]["top5"] == pytest.approx(whole["top5"])
        assert result["merged"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert [r["local"]["n"] for r in results] == [3, 2]  # without all_reduce each rank sees only its shard
