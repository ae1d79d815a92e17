"""Engine speed: trace + prune with pare versus Torch-Pruning (DependencyGraph + one pruner step), same run.

Both prune every prunable group by the same channel ratio with L1 filter norms, on ResNet-50 (1x3x224x224) and
the option-A CIFAR ResNet-56 (1x3x32x32). Writes bench/results/engine_speed.json and prints the time ratio.

    python bench/engine_speed.py [--ratio 0.3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pare
from pare.models import create

RESULTS = Path(__file__).resolve().parent / "results"


def _l1_removals(graph: pare.ChannelGraph, model: torch.nn.Module, ratio: float) -> dict[str, list[int]]:
    removals = {}
    for g in graph.prunable_groups:
        score = np.zeros(g.size)
        for m in g.producers():
            if m.param != "weight":
                continue
            w = model.get_submodule(m.module).weight.detach()
            w = w.narrow(m.dim, m.offset, g.size * m.stride).transpose(0, m.dim)
            score += w.reshape(g.size, -1).abs().sum(1).numpy()
        n = int(g.size * ratio) // g.block * g.block
        if n:
            removals[g.id] = sorted(np.argsort(score, kind="stable")[:n].tolist())
    return removals


def time_pare(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> dict[str, float]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = pare.trace(model, x)
    t1 = time.perf_counter()
    removals = _l1_removals(graph, model, ratio)
    pruned = graph.prune(removals, verify=False)  # like Torch-Pruning: surgery only (verify_cost.py times the check)
    t2 = time.perf_counter()
    with torch.no_grad():
        pruned.eval()(x)
    return {"graph_s": t1 - t0, "prune_s": t2 - t1, "total_s": t2 - t0, "ok": True}


def time_torch_pruning(model: torch.nn.Module, x: torch.Tensor, ratio: float, head: str) -> dict[str, object]:
    import torch_pruning as tp

    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[model.get_submodule(head)],
    )
    t1 = time.perf_counter()
    pruner.step()
    t2 = time.perf_counter()
    result: dict[str, object] = {"graph_s": t1 - t0, "prune_s": t2 - t1, "total_s": t2 - t0}
    try:
        with torch.no_grad():
            model.eval()(x)
        result["ok"] = True
    except Exception as exc:  # Torch-Pruning's known failure on option-A shortcuts is a result, not a crash
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return result


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = {"resnet50": ((1, 3, 224, 224), "fc"), "resnet56": ((1, 3, 32, 32), "linear")}
    rows = {}
    for name, (shape, head) in cases.items():
        base = create(name).eval()
        x = torch.randn(*shape)
        runs_pare, runs_tp = [], []
        for _ in range(args.repeats):
            runs_pare.append(time_pare(base, x, args.ratio))
            runs_tp.append(time_torch_pruning(copy.deepcopy(base), x, args.ratio, head))
        med = {k: statistics.median(r[k] for r in runs_pare) for k in ("graph_s", "prune_s", "total_s")}
        med_tp = {k: statistics.median(float(r[k]) for r in runs_tp) for k in ("graph_s", "prune_s", "total_s")}
        rows[name] = {
            "input_shape": list(shape),
            "pare": {**med, "ok": all(r["ok"] for r in runs_pare)},
            "torch_pruning": {**med_tp, "ok": all(r["ok"] for r in runs_tp),
                              "error": next((r.get("error") for r in runs_tp if not r["ok"]), None)},
            "time_ratio_pare_over_tp": med["total_s"] / med_tp["total_s"],
        }
        error = rows[name]["torch_pruning"]["error"]
        tp_note = "" if rows[name]["torch_pruning"]["ok"] else f"  (Torch-Pruning model broken: {error})"
        print(f"{name}: pare {med['total_s']:.3f} s (graph {med['graph_s']:.3f} + prune {med['prune_s']:.3f}); "
              f"Torch-Pruning {med_tp['total_s']:.3f} s; ratio {rows[name]['time_ratio_pare_over_tp']:.2f}{tp_note}")
    import torch_pruning as tp

    record = {
        "benchmark": "engine_speed",
        "command": "python bench/engine_speed.py " + f"--ratio {args.ratio} --repeats {args.repeats}",
        "channel_ratio": args.ratio,
        "repeats": args.repeats,
        "statistic": "median",
        "criterion": "L1 filter norm (both tools)",
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "unknown"),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "commit": _commit(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
