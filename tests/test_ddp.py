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
from typing import Any

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


def make_image_data(n: int) -> Any:
    from pare.data import ImageDataset

    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    labels = (images[:, 0].float().mean(dim=(1, 2)) > 127.5).long()
    return ImageDataset(images, labels, ["dark", "bright"], "synthetic")


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
    """Both DDP checks in one launch: the process group is made here, so ``fit`` reuses it (rank and world
    size come from it) and the second ``fit`` needs no new rendezvous."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    model, history = run_fit(Path(out_dir))
    rank = int(os.environ["RANK"])
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{prefix}.rank{rank}.pt")
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(history))
    bn_worker(f"{out_dir}-bn", f"{prefix}-bn")
    dist.destroy_process_group()



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One torchrun launch of :func:`worker` (2 gloo processes); (result prefix, out_dir)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    prefix = tmp_path / "ddp"
    # The free port is found before torchrun binds it, so another job on the machine can take it in between;
    # only such launch failures are retried, with a new port.
    for attempt in range(3):
        out_dir = tmp_path / f"out{attempt}"  # fresh, so a failed launch leaves nothing to resume from
        proc = torchrun("worker", out_dir, prefix)
        if proc.returncode == 0 or not any(s in proc.stderr for s in ("EADDRINUSE", "Address already in use")):
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix, out_dir


def test_two_gloo_ranks_match_single_process_at_same_global_batch(ddp_run: tuple[Path, Path]) -> None:
    prefix, out_dir = ddp_run
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
    train = prepare_train_loader(custom, rank_ctx(1, 2), seed=0)
    evaluation, sharded = prepare_eval_loader(custom, rank_ctx(1, 2))
    assert sharded and (train.rank, train.world_size) == (evaluation.rank, evaluation.world_size) == (1, 2)
    assert (custom.rank, custom.world_size) == (0, 1)  # the user's loader is left as it was
    assert prepare_train_loader(train, rank_ctx(1, 2), seed=0) is train  # already this rank's shard


def test_in_memory_loader_built_for_one_process_is_sharded_at_the_same_global_batch() -> None:
    """docs/training.md builds InMemoryLoader without rank/world_size; under DDP fit shards a copy."""
    from pare.data import InMemoryLoader

    loader = InMemoryLoader(make_image_data(64), 16, shuffle=True, normalization="none", seed=0)
    shards = [prepare_train_loader(loader, rank_ctx(r, 2), seed=0) for r in range(2)]
    assert [len(s) for s in shards] == [len(loader)] * 2 and all(s.batch_size == 8 for s in shards)
    rows = [set(s.indices().tolist()) for s in shards]
    assert not rows[0] & rows[1] and rows[0] | rows[1] == set(range(64))
    assert (loader.rank, loader.world_size, loader.batch_size) == (0, 1, 16)


# -------------------- BatchNorm statistics and the documented InMemoryLoader under torchrun


def bn_worker(out_dir: str, prefix: str) -> None:
    """fit as docs/training.md writes it: InMemoryLoader without rank/world_size, a model with BatchNorm."""
    from pare.data import InMemoryLoader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    data = make_image_data(64)
    train = InMemoryLoader(data, GLOBAL_BATCH, shuffle=True, augment="cifar", normalization="cifar", seed=0)
    val = InMemoryLoader(data, 32, shuffle=False, normalization="cifar")
    fit(model, train, val, make_recipe(), out_dir=out_dir, progress=False)
    rank = int(os.environ["RANK"])
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{prefix}.rank{rank}.pt")


def torchrun(mode: str, out_dir: Path, prefix: Path, env: dict[str, str] | None = None,
             wait: bool = True) -> Any:
    """Run this file as ``mode`` worker under torchrun with 2 gloo processes on 127.0.0.1."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CI="1",
                    **(env or {}))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(Path(__file__).resolve()), mode, str(out_dir), str(prefix)]
    if not wait:
        return subprocess.Popen(command, env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(command, env=full_env, cwd=REPO, capture_output=True, text=True, timeout=180)


def test_batchnorm_statistics_agree_across_ranks_with_the_documented_loader(ddp_run: tuple[Path, Path]) -> None:
    prefix, out_dir = ddp_run
    prefix, out_dir = Path(f"{prefix}-bn"), Path(f"{out_dir}-bn")
    rank0 = torch.load(f"{prefix}.rank0.pt", weights_only=True)
    rank1 = torch.load(f"{prefix}.rank1.pt", weights_only=True)
    assert set(rank0) == set(rank1)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
    saved = torch.load(out_dir / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(saved["1.running_var"], rank1["1.running_var"])


# -------------------- a stopped rank


STALL_TIMEOUT_S = 6


def stall_worker(out_dir: str, prefix: str) -> None:
    """Trains until stopped from outside, checkpointing every step; on a DistributedError prints one line and
    exits 2, recording when it gave up."""
    import time

    from pare.errors import PareError

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    Path(f"{prefix}.pid{rank}").write_text(str(os.getpid()))
    model = make_model()
    train = DataLoader(make_data(64, 1), batch_size=GLOBAL_BATCH, shuffle=True)
    val = DataLoader(make_data(30, 2), batch_size=8)
    try:
        fit(model, train, val, make_recipe().replace(epochs=100_000), out_dir=out_dir, progress=False,
            checkpoint_every_steps=1)
    except PareError as exc:
        Path(f"{prefix}.gave_up{rank}").write_text(str(time.time()))
        print(f"pare: error: {exc}", file=sys.stderr)
        sys.exit(2)


def test_stopped_rank_ends_the_run_within_the_timeout(tmp_path: Path) -> None:
    import signal
    import time

    from pare.train import load_checkpoint

    prefix, out = tmp_path / "stall", tmp_path / "out"
    proc = torchrun("stall-worker", out, prefix, env={"PARE_DIST_TIMEOUT_S": str(STALL_TIMEOUT_S)}, wait=False)
    stopped = None
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").is_file() or not Path(f"{prefix}.pid1").is_file():
            assert proc.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        stopped = int(Path(f"{prefix}.pid1").read_text())
        os.kill(stopped, signal.SIGSTOP)
        stop_time = time.time()
        while not Path(f"{prefix}.gave_up0").is_file():
            assert time.time() < stop_time + STALL_TIMEOUT_S + 60, "rank 0 still waits"
            time.sleep(0.2)
        waited = float(Path(f"{prefix}.gave_up0").read_text()) - stop_time
        # torchrun would give the stopped rank a SIGTERM grace period; end it now, we started it.
        os.kill(stopped, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert STALL_TIMEOUT_S - 1 <= waited <= STALL_TIMEOUT_S + 30, waited
    assert proc.returncode != 0
    line = next(line for line in stderr.splitlines() if line.startswith("pare: error: rank 0/2"))
    assert "PARE_DIST_TIMEOUT_S=6" in line and "checkpoint.pt" in line
    state = load_checkpoint(out / "checkpoint.pt")  # the last complete checkpoint loads
    assert state["global_step"] >= 1 and not list(out.glob("*.tmp"))


WORKERS = {"worker": worker, "stall-worker": stall_worker}
if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] in WORKERS:
    WORKERS[sys.argv[1]](sys.argv[2], sys.argv[3])
