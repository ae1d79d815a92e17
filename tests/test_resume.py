"""Atomic checkpoints and exact resume.

The main test kills a training subprocess with SIGKILL after a checkpoint appears, resumes it in a new
subprocess and requires the final weights to be bitwise identical to an uninterrupted run. The training uses
BatchNorm, dropout, shuffling and random augmentation from the torch and NumPy global RNGs, so every piece of
saved state matters.

Run as a script (``python tests/test_resume.py worker OUT_DIR RESULT SLEEP_S``) it is the training worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pare.errors import CheckpointError
from pare.train import Recipe, fit, load_checkpoint
from pare.train import checkpoint as checkpoint_module
from pare.train.hooks import Hook

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8
CHECKPOINT_EVERY = 3


class AugmentedData(Dataset):
    """64 images (3, 8, 8) with labels; each read flips (torch RNG) and adds noise (NumPy RNG)."""

    def __init__(self, n: int = 64, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 8, 8, generator=gen)
        self.labels = (self.images[:, 0].mean(dim=(1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        noise = torch.from_numpy(np.random.normal(0.0, 0.05, size=image.shape).astype(np.float32))
        return image + noise, self.labels[index]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def make_loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(AugmentedData(64, 0), batch_size=64 // STEPS_PER_EPOCH, shuffle=True)
    val = DataLoader(AugmentedData(32, 1), batch_size=16)
    return train, val


def make_recipe() -> Recipe:
    return Recipe(
        name="resume-test",
        epochs=3,
        batch_size=8,
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        schedule="chip",
        warmup_epochs=1,
        label_smoothing=0.1,
        grad_clip_norm=5.0,
        seed=11,
    )


class Sleep(Hook):
    """Slows the worker down so the parent can kill it mid-run; touches no state."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        time.sleep(self.seconds)


class Interrupt(Exception):
    pass


class InterruptAt(Hook):
    """Raises after global step ``step`` (1-based) or at the start of epoch ``epoch``, like a crash."""

    def __init__(self, step: int | None = None, epoch: int | None = None):
        self.step, self.epoch, self.count = step, epoch, 0

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if epoch == self.epoch:
            raise Interrupt

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr: float) -> None:
        self.count += 1
        if self.count == self.step:
            raise Interrupt


def train(out_dir: Path, hooks: tuple[Any, ...] = (), resume: bool = True) -> tuple[nn.Module, Any]:
    torch.set_num_threads(1)
    model = make_model()
    train_loader, val_loader = make_loaders()
    result = fit(
        model,
        train_loader,
        val_loader,
        make_recipe(),
        out_dir=out_dir,
        hooks=hooks,
        resume=resume,
        checkpoint_every_steps=CHECKPOINT_EVERY,
        progress=False,
    )
    return model, result


def worker(out_dir: str, result_path: str, sleep_s: float) -> None:
    model, result = train(Path(out_dir), hooks=(Sleep(sleep_s),) if sleep_s > 0 else ())
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, result_path)
    meta = {"resumed_from": result.resumed_from, "epochs": result.epochs_completed}
    Path(result_path + ".json").write_text(json.dumps(meta))


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metrics_without_time(out_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def run_worker(out_dir: Path, result: Path, sleep_s: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CI="1")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "worker", str(out_dir), str(result), str(sleep_s)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigkill_and_resume_in_new_process_is_bitwise_identical(tmp_path: Path) -> None:
    reference = run_worker(tmp_path / "ref", tmp_path / "ref.pt", 0.0)
    victim_dir = tmp_path / "victim"
    victim = run_worker(victim_dir, tmp_path / "victim.pt", 0.05)
    checkpoint = victim_dir / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    _, err = victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL, err.decode()[-2000:]
    saved = load_checkpoint(checkpoint)
    assert (saved["epoch"], saved["step"]) < (3, 0), "the victim finished before it was killed"

    resumed = run_worker(victim_dir, tmp_path / "resumed.pt", 0.0)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err.decode()[-2000:]
    _, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err.decode()[-2000:]

    meta = json.loads(Path(str(tmp_path / "resumed.pt") + ".json").read_text())
    assert meta["resumed_from"] is not None and meta["epochs"] == 3
    ref_state = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert_same_state(ref_state, torch.load(tmp_path / "resumed.pt", weights_only=True))
    assert metrics_without_time(tmp_path / "ref") == metrics_without_time(victim_dir)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], Path]:
    out_dir = tmp_path_factory.mktemp("reference")
    model, _ = train(out_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}, out_dir


@pytest.mark.parametrize(
    "interrupt",
    [
        InterruptAt(step=5),  # mid-epoch 0, last checkpoint at step 3
        InterruptAt(step=2),  # before any checkpoint: starts over
        InterruptAt(epoch=1),  # right after the epoch-0 checkpoint
        InterruptAt(step=23),  # mid-epoch 2: the last checkpoint is after global step 21 (epoch 2, step 5)
    ],
    ids=["mid-epoch", "no-checkpoint", "epoch-boundary", "later-epoch"],
)
def test_in_process_interrupt_then_resume_matches(
    tmp_path: Path, reference_run: tuple[dict[str, torch.Tensor], Path], interrupt: InterruptAt
) -> None:
    interrupt.count = 0
    with pytest.raises(Interrupt):
        train(tmp_path, hooks=(interrupt,))
    model, result = train(tmp_path)
    ref_state, ref_dir = reference_run
    assert_same_state(ref_state, model.state_dict())
    assert metrics_without_time(ref_dir) == metrics_without_time(tmp_path)
    assert (result.resumed_from is None) == (interrupt.step == 2)


def test_checkpoint_contents_load_with_weights_only(
    reference_run: tuple[dict[str, torch.Tensor], Path],
) -> None:
    ref_state, ref_dir = reference_run
    raw = torch.load(ref_dir / "checkpoint.pt", weights_only=True)
    assert (raw["epoch"], raw["step"], raw["global_step"]) == (3, 0, 3 * STEPS_PER_EPOCH)
    assert raw["recipe"] == make_recipe().to_dict()
    assert set(raw["rng"][0]) >= {"python", "numpy_key", "torch"}
    assert "momentum_buffer" in raw["optimizer"]["state"][0]
    assert_same_state(ref_state, raw["model"])
    assert not list(ref_dir.glob(".*.tmp")), "temporary files left behind"


def test_resume_false_restarts_and_recipe_mismatch_is_refused(
    tmp_path: Path, reference_run: tuple[dict[str, torch.Tensor], Path]
) -> None:
    with pytest.raises(Interrupt):
        train(tmp_path, hooks=(InterruptAt(step=7),))
    model, result = train(tmp_path, resume=False)
    assert result.resumed_from is None
    assert_same_state(reference_run[0], model.state_dict())
    train_loader, val_loader = make_loaders()
    with pytest.raises(CheckpointError, match="another recipe"):
        fit(make_model(), train_loader, val_loader, make_recipe().replace(lr=0.1), out_dir=tmp_path)


def test_corrupt_or_foreign_checkpoint_gives_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        train(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a pare training checkpoint"):
        train(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "checkpoint.pt"
    checkpoint_module.atomic_torch_save({"value": torch.tensor([1.0])}, target)

    def broken_save(obj: Any, handle: Any) -> None:
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint_module.atomic_torch_save({"value": torch.tensor([2.0])}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["value"], torch.tensor([1.0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
