"""Per-sample training time: 1 process vs 2 DDP processes (gloo, CPU), one thread each.

Both runs train a CIFAR-size ResNet-20 (3×32×32 inputs, widths 16/32/64, BatchNorm) with SGD for the same
number of steps at the same *global* batch; the two-process run gives each rank half of it. Per-sample time is
the timed wall-clock of the step loop divided by the global samples processed. Ideal scaling gives a ratio
(2 processes / 1 process) of 0.5; the gap to it is the DDP overhead (gradient all-reduce over gloo, process
synchronisation) plus whatever else runs on the machine's cores.

    python bench/ddp_overhead.py [--steps 30] [--global-batch 64] [--warmup 3]

writes bench/results/ddp_overhead.json and prints the ratio. Internally it re-runs itself as the worker, once
with plain ``python`` and once under ``torchrun --nproc_per_node=2`` on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
RESULT_PATH = REPO / "bench" / "results" / "ddp_overhead.json"


class BasicBlock(nn.Module):
    """CIFAR ResNet block; a 1×1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H/stride, W/stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 for 32×32 inputs: (N, 3, 32, 32) -> logits (N, num_classes)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    in_channels = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(3):
            layers.append(BasicBlock(in_channels, width, stride if block == 0 else 1))
            in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def worker(steps: int, warmup: int, global_batch: int, result_path: str) -> None:
    """One process of a run: time ``steps`` SGD steps after ``warmup`` untimed ones."""
    from pare.train import Recipe, build_optimizer, setup_distributed

    torch.set_num_threads(1)
    ctx = setup_distributed("cpu")
    per_rank = global_batch // ctx.world_size
    torch.manual_seed(ctx.rank)
    images = torch.randn(per_rank, 3, 32, 32)
    labels = torch.randint(0, 10, (per_rank,))
    torch.manual_seed(0)
    model: nn.Module = resnet20()
    optimizer = build_optimizer(model, Recipe(lr=0.01, momentum=0.9, weight_decay=5e-4))
    if ctx.is_distributed:
        model = nn.parallel.DistributedDataParallel(model)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    ctx.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    ctx.barrier()
    elapsed_s = time.perf_counter() - started
    if ctx.is_main:
        Path(result_path).write_text(json.dumps({"world_size": ctx.world_size, "seconds": elapsed_s}))
    ctx.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(processes: int, args: argparse.Namespace, result_path: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = [str(Path(__file__).resolve()), "--worker", str(result_path)]
    script += [
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--global-batch",
        str(args.global_batch),
    ]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed SGD steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--global-batch", type=int, default=64, help="samples per step, summed over processes"
    )
    parser.add_argument("--worker", metavar="RESULT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.global_batch < 2 or args.global_batch % 2:
        parser.error("need --steps >= 1, --warmup >= 0 and an even --global-batch >= 2")
    if args.worker:
        worker(args.steps, args.warmup, args.global_batch, args.worker)
        return

    samples = args.steps * args.global_batch
    with tempfile.TemporaryDirectory() as tmp:
        one_s = run(1, args, Path(tmp) / "one.json")
        two_s = run(2, args, Path(tmp) / "two.json")
    per_sample_one_ms = 1000.0 * one_s / samples
    per_sample_two_ms = 1000.0 * two_s / samples
    ratio = per_sample_two_ms / per_sample_one_ms
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count() or 0
    record = {
        "command": " ".join([Path(sys.executable).name, "bench/ddp_overhead.py", *sys.argv[1:]]),
        "model": "resnet20 (CIFAR, 32x32, BatchNorm, 1x1 projection shortcuts)",
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "global_batch": args.global_batch,
        "threads_per_process": 1,
        "backend": "gloo (CPU, 127.0.0.1)",
        "per_sample_ms_1proc": per_sample_one_ms,
        "per_sample_ms_2proc": per_sample_two_ms,
        "ratio_2proc_over_1proc": ratio,
        "ideal_ratio": 0.5,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "note": "cores are shared with other jobs; the ratio includes their interference",
    }
    RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULT_PATH.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"per-sample time: 1 process {per_sample_one_ms:.3f} ms, 2 processes {per_sample_two_ms:.3f} ms; "
        f"ratio {ratio:.3f} (ideal 0.5)"
    )


if __name__ == "__main__":
    main()
