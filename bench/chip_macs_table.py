"""CHIP MACs table: recount every row of methods.md §7.2 with pare.count and compare with the reported figures.

Each row builds the zoo model with its CHIP / HRankPlus sparsity string (``pare.models.create(name,
sparsity=...)``), counts one 1x3x32x32 image under the ``"macs"`` convention (conv + linear MACs) and the
``"chip"`` convention (the README's thop convention: + conv-bias adds + 2 ops per BN element), and checks:

* the exact integers of §7.2 (conv+FC MACs, BN elements; for VGG also conv-only MACs and conv + bias + FC),
  derived arithmetically in the spec;
* the figure the README reports, rounded to 0.01M, under the convention the README used for that row (pruned
  rows: ``chip``; the unpruned baselines were listed without BN, i.e. ``macs``).

Counting only (no data, no weights): a few seconds. Writes bench/results/chip_macs_table.json.

    python bench/chip_macs_table.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _common import environment, git_commit  # noqa: E402  (bench/ is on sys.path when run as a script)

from pare.count import Counts, count  # noqa: E402
from pare.models import create  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Row:
    """One row of methods.md §7.2. ``expected_*`` are the spec's exact integers; ``reported_m`` the README's
    figure in millions; ``reported_convention`` the counting convention under which the README figure was made."""

    model: str
    sparsity: str | None
    expected_conv_fc_macs: int
    expected_bn_elements: int
    reported_m: float
    reported_convention: str
    expected_conv_macs: int | None = None  # VGG only: conv layers alone
    expected_conv_bias_fc: int | None = None  # VGG only: conv + conv-bias adds + FC


# methods.md §7.2 ("Exact-reproduction checks"), in the spec's order. BN elements for VGG are the BatchNorm2d
# elements only; the spec notes that the classifier's BatchNorm1d (512) does not move the rounded value.
ROWS: tuple[Row, ...] = (
    Row("resnet56", "[0.]+[0.15]*2+[0.4]*27", 65_168_128, 383_872, 65.94, "chip"),
    Row("resnet56", "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 34_197_184, 292_288, 34.78, "chip"),
    Row("resnet56", "[0.]+[0.18]*29", 89_460_352, 442_624, 90.35, "chip"),
    Row("resnet110", "[0.]+[0.2]*2+[0.3]*18+[0.35]*36", 139_006_144, 768_640, 140.54, "chip"),
    Row("resnet110", "[0.]+[0.22]*2+[0.35]*18+[0.45]*36", 119_638_144, 724_864, 121.09, "chip"),
    Row("resnet110", "[0.]+[0.4]*2+[0.5]*18+[0.65]*36", 70_554_880, 567_040, 71.69, "chip"),
    Row("vgg16_bn_cifar", "[0.21]*7+[0.75]*5", 130_299_264 + 267_264, 202_112, 131.17, "chip",
        expected_conv_macs=130_299_264, expected_conv_bias_fc=130_768_640),
    Row("vgg16_bn_cifar", "[0.3]*7+[0.75]*5", 103_975_488 + 267_264, 179_264, 104.78, "chip",
        expected_conv_macs=103_975_488, expected_conv_bias_fc=104_422_016),
    Row("vgg16_bn_cifar", "[0.45]*7+[0.78]*5", 66_253_824 + 267_264, 142_720, 66.95, "chip",
        expected_conv_macs=66_253_824, expected_conv_bias_fc=66_663_808),
    Row("resnet56", None, 125_485_696, 532_480, 125.49, "macs"),
    Row("resnet110", None, 252_887_680, 1_048_576, 252.89, "macs"),
)


def bn2d_elements(counts: Counts) -> int:
    """BN elements of the BatchNorm2d layers only (the §7.2 column; VGG's classifier also has a BatchNorm1d)."""
    return sum(layer.bn_elements for layer in counts.layers if layer.type == "BatchNorm2d")


def measure(row: Row) -> dict[str, Any]:
    """Count one row under both conventions and compare with the spec's integers and the reported figure."""
    model = create(row.model, sparsity=row.sparsity).eval()
    x = torch.zeros(1, 3, 32, 32)
    macs = count(model, x, convention="macs")
    chip = count(model, x, convention="chip")
    conv_fc = macs.conv_macs + macs.linear_macs
    bn = bn2d_elements(chip)
    ours = chip.macs if row.reported_convention == "chip" else macs.macs
    ours_m = round(ours / 1e6, 2)
    record: dict[str, Any] = {
        "model": row.model,
        "sparsity": row.sparsity or "unpruned",
        "reported_m": row.reported_m,
        "reported_convention": row.reported_convention,
        "ours_macs_convention": macs.macs,
        "ours_chip_convention": chip.macs,
        "ours_m": ours_m,
        "conv_fc_macs": conv_fc,
        "expected_conv_fc_macs": row.expected_conv_fc_macs,
        "bn2d_elements": bn,
        "expected_bn2d_elements": row.expected_bn_elements,
        "params": chip.params,
        "params_no_bn_affine": chip.params_no_bn_affine,
    }
    exact = conv_fc == row.expected_conv_fc_macs and bn == row.expected_bn_elements
    if row.expected_conv_macs is not None:
        record["conv_macs"] = macs.conv_macs
        record["expected_conv_macs"] = row.expected_conv_macs
        record["conv_bias_fc"] = macs.conv_macs + chip.conv_bias_adds + macs.linear_macs
        record["expected_conv_bias_fc"] = row.expected_conv_bias_fc
        exact = exact and record["conv_macs"] == row.expected_conv_macs
        exact = exact and record["conv_bias_fc"] == row.expected_conv_bias_fc
    record["exact_integers_match"] = exact
    record["reported_match"] = ours_m == row.reported_m
    record["match"] = exact and record["reported_match"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "chip_macs_table.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = [measure(r) for r in ROWS]
    seconds = time.perf_counter() - t0
    for r in rows:
        flag = "ok" if r["match"] else "MISMATCH"
        print(f"{r['model']:<15} {r['sparsity']:<40} reported {r['reported_m']:>7.2f}M  ours {r['ours_m']:>7.2f}M "
              f"({r['reported_convention']})  {flag}")
    record = {
        "benchmark": "chip_macs_table",
        "command": "python bench/chip_macs_table.py",
        "source": "methods.md §7.2 (exact-reproduction checks) and the CHIP / HRankPlus README figures",
        "input_shape": [1, 3, 32, 32],
        "rows": rows,
        "all_match": all(r["match"] for r in rows),
        "seconds": round(seconds, 2),
        "git_commit": git_commit(),
        "timestamp_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"all rows match: {record['all_match']}; wrote {args.out}")


if __name__ == "__main__":
    main()
