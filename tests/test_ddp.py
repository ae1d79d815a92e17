"""DistributedDataParallel: 2 gloo processes on CPU (127.0.0.1) against one process at the same global batch.

The model has no BatchNorm, so the per-rank forward computes exactly what the single process computes on the
same samples; DDP averages the per-rank mean-loss gradients, which equals the gradient of the global-batch
mean. The only differences left are float32 summation order, hence the 1e-5 tolerance.

Run as a script under torchrun (``tests/test_ddp.py worker OUT_DIR RESULT_PREFIX``) it is the DDP worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pare.errors import ConfigError
from pare.train import Recipe, fit
from pare.train.distributed import DistContext, prepare_eval_loader, prepare_train_loader

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
EPOCHS = 2


def make_data(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=gen)
    labels = (images[:, 0].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(images, labels)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def make_recipe() -> Recipe:
    return Recipe(
        name="ddp-test",
        epochs=EPOCHS,
        batch_size=GLOBAL_BATCH,
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        label_smoothing=0.1,
        grad_clip_norm=10.0,
        seed=3,
    )


def run_fit(out_dir: Path | None, batch: int = GLOBAL_BATCH) -> tuple[nn.Module, list[dict[str, float]]]:
    torch.set_num_threads(1)
    model = make_model()
    train = DataLoader(make_data(64, 1), batch_size=batch, shuffle=True)
    val = DataLoader(make_data(30, 2), batch_size=8)
    result = fit(model, train, val, make_recipe(), out_dir=out_dir, progress=False)
    return model, result.history


def worker(out_dir: str, prefix: str) -> None:
    model, history = run_fit(Path(out_dir))
    rank = int(os.environ["RANK"])
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{prefix}.rank{rank}.pt")
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(history))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_gloo_ranks_match_single_process_at_same_global_batch(tmp_path: Path) -> None:
    prefix = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CI="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # The free port is found before torchrun binds it, so another job on the machine can take it in between;
    # only such launch failures are retried, with a new port.
    for attempt in range(3):
        out_dir = tmp_path / f"out{attempt}"  # fresh, so a failed launch leaves nothing to resume from
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(Path(__file__).resolve()), "worker", str(out_dir), str(prefix),
        ]  # fmt: skip
        proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, timeout=180)
        stderr = proc.stderr.decode(errors="replace")
        if proc.returncode == 0 or not any(s in stderr for s in ("EADDRINUSE", "Address already in use")):
            break
    assert proc.returncode == 0, stderr[-3000:]

    single, single_history = run_fit(None)
    rank0 = torch.load(f"{prefix}.rank0.pt", weights_only=True)
    rank1 = torch.load(f"{prefix}.rank1.pt", weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks diverged on {key}"
        assert torch.allclose(rank0[key], value, rtol=0, atol=1e-5), f"{key}: DDP differs from single process"
    # Sharded evaluation sums over ranks: the same 30 validation samples, each counted once.
    ddp_history = json.loads(Path(f"{prefix}.rank0.json").read_text())
    assert [h["val_acc"] for h in ddp_history] == [h["val_acc"] for h in single_history]
    for ddp_row, single_row in zip(ddp_history, single_history):
        assert ddp_row["train_loss"] == pytest.approx(single_row["train_loss"], abs=1e-5)
    # Rank 0 alone logs and checkpoints.
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == EPOCHS
    assert (out_dir / "checkpoint.pt").is_file()

    # Negative control: the per-rank batch alone (8) is a different optimisation, far outside the tolerance.
    half, _ = run_fit(None, batch=GLOBAL_BATCH // 2)
    assert not torch.allclose(half[0].weight, rank0["0.weight"], rtol=0, atol=1e-3)


# -------------------- sharding without a process group


def rank_ctx(rank: int, world_size: int) -> DistContext:
    return DistContext(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))


def test_train_shards_partition_the_single_process_batches() -> None:
    data = make_data(64, 1)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=True)
    single = prepare_train_loader(loader, rank_ctx(0, 1), seed=3)
    shards = [prepare_train_loader(loader, rank_ctx(r, 2), seed=3) for r in range(2)]
    for epoch in range(2):
        for part in (single, *shards):
            part.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        single_batches = [set(batch) for batch in _index_batches(single)]
        shard_batches = [_index_batches(s) for s in shards]
        assert all(len(b) == GLOBAL_BATCH // 2 for s in shard_batches for b in s)
        merged = [set(a) | set(b) for a, b in zip(*shard_batches)]
        assert merged == single_batches
    assert isinstance(single.sampler, DistributedSampler)  # type: ignore[attr-defined]


def _index_batches(loader: DataLoader) -> list[list[int]]:
    indices = list(iter(loader.sampler))
    size = int(loader.batch_size)  # type: ignore[arg-type]
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_eval_shards_are_disjoint_and_unpadded() -> None:
    loader = DataLoader(make_data(30, 2), batch_size=8)
    parts = [prepare_eval_loader(loader, rank_ctx(r, 4)) for r in range(4)]
    assert all(sharded for _, sharded in parts)
    seen = sorted(i for part, _ in parts for i in part.sampler)  # type: ignore[attr-defined]
    assert seen == list(range(30))


def test_unshardable_inputs_raise_config_error() -> None:
    loader = DataLoader(make_data(30, 2), batch_size=15, shuffle=True)
    with pytest.raises(ConfigError, match="not divisible"):
        prepare_train_loader(loader, rank_ctx(0, 2), seed=0)
    with pytest.raises(ConfigError, match="cannot be sharded"):
        prepare_train_loader([(torch.zeros(2, 3), torch.zeros(2))], rank_ctx(0, 2), seed=0)

    class SelfSharding:
        rank, world_size = 0, 1

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter([])

    custom = SelfSharding()
    assert prepare_train_loader(custom, rank_ctx(1, 2), seed=0) is custom
    _, sharded = prepare_eval_loader(custom, rank_ctx(1, 2))
    assert sharded and (custom.rank, custom.world_size) == (1, 2)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3])
