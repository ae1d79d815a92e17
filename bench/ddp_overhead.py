"""Per-sample training time of ``pare.train.fit``: 1 process vs 2 DDP processes (gloo, CPU), one thread each.

Both runs fine-tune pare's CIFAR ResNet-20 (``pare.models.create("resnet20")``, 3x32x32 inputs) with the same
``fit`` call on the same synthetic data set at the same *global* batch; under ``torchrun`` ``fit`` shards the
loader with a DistributedSampler and wraps the model in DDP, so each rank trains half of every batch. Two epochs
of ``--steps`` steps run; only the second is timed (from ``on_epoch_start`` to ``on_epoch_end`` hooks, so
validation and checkpoints are excluded). Per-sample time = timed wall-clock / global samples of that epoch.
The pair (1 process, 2 processes) is measured ``--repeats`` times, interleaved, and the medians are compared.
Ideal scaling gives a ratio (2 processes / 1 process) of 0.5; overhead = ratio / 0.5 - 1 (gradient all-reduce
over gloo, synchronisation, and whatever else runs on the machine's cores: the load average is recorded).

    python bench/ddp_overhead.py [--steps 30] [--global-batch 128] [--repeats 3]

writes bench/results/ddp_overhead.json and prints the ratio. Internally it re-runs itself as the worker, once
with plain ``python`` and once under ``torchrun --nproc_per_node=2`` on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULT_PATH = REPO / "bench" / "results" / "ddp_overhead.json"

from _common import environment, git_commit  # noqa: E402  (bench/ is on sys.path when run as a script)


class EpochTimer:
    """A ``fit`` hook: wall-clock seconds of each epoch's training steps (no validation, no checkpoint)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds: list[float] = []

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def worker(steps: int, global_batch: int, result_path: str) -> None:
    """One process of a run: two epochs of ``steps`` steps through ``pare.train.fit``; the second is timed."""
    from pare.models import create
    from pare.train import Recipe, fit

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)  # every rank builds the same data set; the sampler shards it
    images = torch.randn(steps * global_batch, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (steps * global_batch,), generator=gen)
    train = DataLoader(TensorDataset(images, labels), batch_size=global_batch, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(images[:global_batch], labels[:global_batch]), batch_size=global_batch)
    torch.manual_seed(0)
    model = create("resnet20")
    recipe = Recipe(name="ddp-bench", epochs=2, batch_size=global_batch, lr=0.01, momentum=0.9,
                    weight_decay=5e-4, schedule="cosine", seed=0)
    timer = EpochTimer()
    fit(model, train, val, recipe, hooks=[timer], progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        Path(result_path).write_text(json.dumps({"world_size": world, "seconds": timer.seconds[-1]}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(processes: int, args: argparse.Namespace, result_path: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = [str(Path(__file__).resolve()), "--worker", str(result_path)]
    script += ["--steps", str(args.steps), "--global-batch", str(args.global_batch)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={processes}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *script,
        ]
    subprocess.run(command, env=env, cwd=REPO, check=True)
    return float(json.loads(result_path.read_text())["seconds"])


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per epoch (2 epochs; the second is timed)")
    parser.add_argument("--global-batch", type=int, default=128, help="samples per step, summed over processes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (1-process, 2-process) pairs")
    parser.add_argument("--results", default=str(RESULT_PATH), help="results JSON")
    parser.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.global_batch < 2 or args.global_batch % 2:
        parser.error("need --steps >= 1, --repeats >= 1 and an even --global-batch >= 2")
    if args.worker:
        worker(args.steps, args.global_batch, args.worker)
        return

    samples = args.steps * args.global_batch
    load_before = load_average()
    one: list[float] = []
    two: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            one.append(1000.0 * run(1, args, Path(tmp) / f"one{i}.json") / samples)
            two.append(1000.0 * run(2, args, Path(tmp) / f"two{i}.json") / samples)
    per_sample_one_ms, per_sample_two_ms = statistics.median(one), statistics.median(two)
    ratio = per_sample_two_ms / per_sample_one_ms
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count() or 0
    record: dict[str, Any] = {
        "command": " ".join(["python", "bench/ddp_overhead.py", *sys.argv[1:]]),
        "git_commit": git_commit(mark_dirty=True),
        "trainer": "pare.train.fit (DistributedSampler + DDP under torchrun), epoch 2 of 2 timed by fit hooks",
        "model": "pare resnet20 (CIFAR, 32x32 synthetic inputs)",
        "steps": args.steps,
        "warmup_steps": args.steps,  # the untimed first epoch
        "global_batch": args.global_batch,
        "repeats": args.repeats,
        "threads_per_process": 1,
        "backend": "gloo (CPU, 127.0.0.1)",
        "per_sample_ms_1proc_runs": [round(v, 4) for v in one],
        "per_sample_ms_2proc_runs": [round(v, 4) for v in two],
        "per_sample_ms_1proc": per_sample_one_ms,
        "per_sample_ms_2proc": per_sample_two_ms,
        "ratio_2proc_over_1proc": ratio,
        "ideal_ratio": 0.5,
        "overhead": ratio / 0.5 - 1,
        "usable_cores": usable_cores,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **environment(),
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"per-sample time (median of {args.repeats}): 1 process {per_sample_one_ms:.3f} ms, 2 processes "
          f"{per_sample_two_ms:.3f} ms; ratio {ratio:.3f} (ideal 0.5), overhead {100 * (ratio / 0.5 - 1):.1f}%")


if __name__ == "__main__":
    main()
