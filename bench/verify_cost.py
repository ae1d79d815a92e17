"""Cost of verification: a whole ``pare.prune`` of ResNet-50 (1x3x224x224, l1, 30% fewer MACs) verified against
the independent masked reference versus the same call with ``verify=False``, interleaved in one run.

Writes bench/results/verify_cost.json with the median wall time of each, the ratio of the medians, the per-pair
ratios, and the machine's load average before and after (the CPU may be shared: read the ratio, not the seconds).

    python bench/verify_cost.py [--repeats 3] [--model resnet50] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import environment, git_commit

import pare
from pare.models import create

RESULTS = Path(__file__).resolve().parent / "results"


def timed_prune(model: torch.nn.Module, x: torch.Tensor, verify: bool) -> float:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pare.prune(model, x, criterion="l1", target=pare.Budget(macs_reduction=0.3), verify=verify)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "verify_cost.json")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    torch.manual_seed(0)
    model = create(args.model).eval()
    x = torch.randn(1, 3, args.size, args.size)
    load_before = os.getloadavg()
    timed_prune(model, x, False)  # warm-up (imports, allocator)
    verified, unverified = [], []
    for _ in range(args.repeats):  # interleaved, so that a change in load hits both
        unverified.append(timed_prune(model, x, False))
        verified.append(timed_prune(model, x, True))
    load_after = os.getloadavg()
    ratio = statistics.median(verified) / statistics.median(unverified)
    record = {
        "what": f"pare.prune({args.model}, 1x3x{args.size}x{args.size}, l1, macs_reduction=0.3): verified vs "
                "verify=False, interleaved repeats",
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + f"python bench/verify_cost.py --model {args.model} --size {args.size} --repeats {args.repeats}",
        "commit": git_commit(mark_dirty=True),
        "environment": {**environment(), "torch_threads": torch.get_num_threads()},
        "load_average_1_5_15_before": list(load_before),
        "load_average_1_5_15_after": list(load_after),
        "verified_s": verified,
        "unverified_s": unverified,
        "verified_median_s": statistics.median(verified),
        "unverified_median_s": statistics.median(unverified),
        "ratio_verified_over_unverified": ratio,
        "pair_ratios": [v / u for v, u in zip(verified, unverified)],
        "target_ratio_at_most": 2.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.model} {args.size}px: verified {record['verified_median_s']:.3f} s, unverified "
          f"{record['unverified_median_s']:.3f} s, ratio {ratio:.2f} (load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}); wrote {args.out}")


if __name__ == "__main__":
    main()
