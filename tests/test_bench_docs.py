"""The generated benchmarks page (bench/make_docs.py), the runner (bench/run_all.py) and the runnable docs.

* make_docs renders one section per benchmark from sample JSONs, including absent and unknown ones, and
  computes the targets' verdicts from the data; ``--check`` detects a stale page; the committed
  docs/benchmarks.md is a fresh render of the committed bench/results (rerun ``python bench/make_docs.py``
  after adding results).
* run_all skips scripts that are missing or need /work/shared when it is absent.
* Every Python block of docs/concepts.md, docs/criteria/adding.md and docs/adding-an-operator.md runs as
  written; every registered criterion has its page.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pare.criteria
from pare.criteria import base as criteria_base
from pare.graph import rules

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(REPO / "bench"))
make_docs = importlib.import_module("make_docs")
run_all = importlib.import_module("run_all")


def write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data))



def speed_row(config: str, library: str, batch: int, macs_ratio: float, speedup: float) -> dict:
    """A ResNet-50 eager row as bench/speedup.py writes it."""
    return {"model": "resnet50", "config": config, "library": library, "backend": "eager", "batch": batch,
            "macs_ratio": macs_ratio, "speedup": speedup, "speedup_over_macs_ratio": speedup / macs_ratio}

def engine_json(ratio50: float) -> dict[str, Any]:
    def case(ratio: float) -> dict[str, Any]:
        return {"input_shape": [1, 3, 32, 32], "pare": {"graph_s": 0.01, "prune_s": 0.01, "total_s": 0.02},
                "torch_pruning": {"graph_s": 0.02, "prune_s": 0.01, "total_s": 0.02 / ratio, "ok": True,
                                  "error": None},
                "time_ratio_pare_over_tp": ratio}

    return {"command": "python bench/engine_speed.py --ratio 0.3 --repeats 5", "channel_ratio": 0.3, "repeats": 5,
            "statistic": "median", "criterion": "L1", "commit": "0123456789abcdef0123", "torch": "2.x",
            "results": {"resnet50": case(ratio50), "resnet56": case(0.6)}}


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a rendered page."""
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_make_docs_sections_targets_absent_and_unknown(tmp_path: Path) -> None:
    write(tmp_path / "engine_speed.json", engine_json(0.7))
    # accuracy_oneshot.json in a layout the renderer does not know: generic figures, target cannot be evaluated
    write(tmp_path / "accuracy_oneshot.json", {"accuracy": {"best": 80.5}, "runs": [{"name": "x", "acc": 1.5}]})
    write(tmp_path / "chip_macs_table.json", {"rows": [
        {"model": "resnet56", "sparsity": "[0.]", "conv_fc_macs": 1, "bn2d_elements": 2, "ours_m": 1.0,
         "reported_m": 1.0, "reported_convention": "chip", "match": True},
        {"model": "resnet110", "sparsity": "[0.]", "conv_fc_macs": 1, "bn2d_elements": 2, "ours_m": 1.0,
         "reported_m": 1.1, "reported_convention": "chip", "match": False},
    ]})
    write(tmp_path / "speedup.json", {"rows": [
        speed_row("uniform", "pare", 1, 2.0, 1.9),
        speed_row("uniform", "pare", 1, 4.1, 3.0),
    ]})
    write(tmp_path / "mystery.json", {"answer": 42, "nested": {"x": 0.25}})
    text = make_docs.render(tmp_path)

    for sec in make_docs.SECTIONS:
        assert f"## {sec.title}\n" in text
    engine = section(text, "Engine speed: trace + prune versus Torch-Pruning")
    assert "**0.70**" in engine and "**not met** (0.70x)" in engine and "commit 0123456789ab" in engine
    oneshot = section(text, "Accuracy protocol: one-shot, pare's default versus Torch-Pruning (issue 17)")
    assert "Layout not recognised" in oneshot and "| accuracy.best | 80.5 |" in oneshot
    assert "**cannot evaluate**" in oneshot
    chip = section(text, "CHIP MACs table")
    assert "**not met** (1 of 2 rows)" in chip
    speed = section(text, "Measured speed-up versus MACs (issue 6)")
    assert "**not met**" in speed and "4x: eager 0.73 (uniform)" in speed
    assert "Not run yet: `python bench/accuracy.py finetune` (needs /work/shared)." in section(
        text, "Accuracy protocol: one epoch of fine-tuning from the same start (issue 17)")
    assert "Not run yet: `python bench/ddp_overhead.py`." in section(text, "Distributed overhead")
    mystery = section(text, "mystery (no dedicated section)")
    assert "| answer | 42 |" in mystery and "| nested.x | 0.25 |" in mystery
    summary = section(text, "Targets")
    assert "| not met | 0.70x |" in summary and "| not run yet | `python bench/accuracy.py finetune` |" in summary
    assert make_docs.render(tmp_path) == text  # deterministic: nothing but the JSONs goes in


def test_make_docs_targets_met_from_data(tmp_path: Path) -> None:
    write(tmp_path / "engine_speed.json", engine_json(0.4))
    write(tmp_path / "speedup.json", {"rows": [
        speed_row("uniform", "pare", 1, 2.0, 1.85),
        speed_row("uniform", "pare", 1, 3.9, 3.6),
        speed_row("uniform", "pare", 8, 3.9, 1.0),  # not batch 1: ignored
        speed_row("L1", "torch-pruning 1.6", 1, 3.9, 2.0),
    ]})
    rows = [{"model": m, "seed": k, "label": label, "lossless932_top1": acc}
            for m in ("resnet20", "resnet32", "resnet56") for k in range(3)
            for label, acc in (("pare default", 0.90 + 0.001 * k), ("torch-pruning l1, same repair", 0.89))]
    summary = {key: {f"{m} | {label}": {"mean": 0.901 if label == "pare default" else 0.89, "sd": 0.001, "n": 3}
                     for m in ("resnet20", "resnet32", "resnet56")
                     for label in ("pare default", "torch-pruning l1, same repair")}
               for key in ("val_top1", "lossless932_top1", "jpeg_test_top1")}
    write(tmp_path / "accuracy_finetune.json", {"rows": rows, "summary": summary, "default": {}})
    text = make_docs.render(tmp_path)
    assert "**met** (0.40x)" in section(text, "Engine speed: trace + prune versus Torch-Pruning")
    assert "**met**" in section(text, "Measured speed-up versus MACs (issue 6)")
    finetune = section(text, "Accuracy protocol: one epoch of fine-tuning from the same start (issue 17)")
    assert "**met** (resnet20: +1.10 points (n=3)" in finetune
    assert "| resnet56 | pare default | 0.00% | 90.10 ± 0.10 (n=3) |" in finetune


def test_make_docs_check_detects_stale_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, out = tmp_path / "results", tmp_path / "benchmarks.md"
    results.mkdir()
    write(results / "engine_speed.json", engine_json(0.4))
    assert make_docs.main(["--results", str(results), "--out", str(out), "--check"]) == 1  # absent page
    assert make_docs.main(["--results", str(results), "--out", str(out)]) == 0
    assert make_docs.main(["--results", str(results), "--out", str(out), "--check"]) == 0
    write(results / "engine_speed.json", engine_json(0.6))  # new results, page not regenerated
    assert make_docs.main(["--results", str(results), "--out", str(out), "--check"]) == 1
    assert "stale" in capsys.readouterr().err


def test_committed_benchmarks_page_is_current() -> None:
    """docs/benchmarks.md must be the render of bench/results: after adding results, run bench/make_docs.py."""
    expected = make_docs.render(REPO / "bench" / "results")
    assert (DOCS / "benchmarks.md").read_text() == expected, "stale: run python bench/make_docs.py"


def test_run_all_skips_missing_and_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("engine_speed", "accuracy"):
        (bench / f"{name}.py").write_text('parser.add_argument("--quick")\n' if name == "engine_speed" else "")
    monkeypatch.setattr(run_all, "BENCH", bench)
    out = run_all.run(["engine_speed", "accuracy_oneshot", "speedup"], quick=True, dry_run=True,
                      shared=tmp_path / "none")
    status = {o.name: o for o in out}
    assert status["engine_speed"].status == "would run" and status["engine_speed"].command.endswith("--quick")
    assert status["accuracy_oneshot"].status.startswith("skipped: needs")
    assert status["speedup"].status.startswith("skipped: bench/speedup.py does not exist")
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark", "--dry-run"])


# -- runnable documentation ------------------------------------------------------------------------------------


def python_blocks(path: Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path} has no python block"
    return blocks


def run_blocks(path: Path) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"doc_{path.stem}"}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.relative_to(REPO)} block {i + 1}", "exec"), namespace)
    return namespace


def test_concepts_snippets_run(capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_blocks(DOCS / "concepts.md")
    printed = capsys.readouterr().out
    assert "16 14" in printed and "40551040 269722 268346" in printed and "40927872" in printed
    assert ns["grouped"].residual_mode == "grouped" and abs(ns["grouped"].macs_reduction - 0.5) <= 0.005
    assert ns["res"].residual_mode == "internal"
    assert "unreachable: cannot reach a reduction of 0.6000" in printed


@pytest.fixture
def restore_registries() -> Iterator[None]:
    trace_module = importlib.import_module("pare.graph.trace")
    leaf_types, module_rules = trace_module.LEAF_TYPES, list(rules.MODULE_RULES)
    criteria = dict(criteria_base._REGISTRY)
    try:
        yield
    finally:
        trace_module.LEAF_TYPES = leaf_types
        rules.MODULE_RULES[:] = module_rules
        criteria_base._REGISTRY.clear()
        criteria_base._REGISTRY.update(criteria)


@pytest.mark.usefixtures("restore_registries")
def test_adding_a_criterion_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_blocks(DOCS / "criteria" / "adding.md")
    assert ns["result"].criterion == "apoz" and abs(ns["result"].macs_reduction - 0.3) <= 0.005
    assert capsys.readouterr().out.splitlines() == ["True", "apoz True"]


@pytest.mark.usefixtures("restore_registries")
def test_adding_an_operator_example_runs() -> None:
    ns = run_blocks(DOCS / "adding-an-operator.md")
    assert ns["graph"].group("0").prunable
    assert tuple(ns["pruned"][2].scale.shape) == (6,)


def test_every_criterion_has_a_page() -> None:
    index = (DOCS / "criteria" / "index.md").read_text()
    for cls in pare.criteria.list_criteria():
        page = DOCS / "criteria" / f"{cls.name}.md"
        assert page.exists(), f"criterion '{cls.name}' has no page {page}"
        assert f"| `{cls.name}` |" in index, f"criterion '{cls.name}' missing from docs/criteria/index.md"
    similarity = (DOCS / "criteria" / "similarity.md").read_text()
    assert "reconstructed from the abstract" in similarity
