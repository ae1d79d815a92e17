"""Reports of pruning runs: ``report.md``, ``metrics.json`` and PNG plots in one output folder.

The command line (``pare prune``, ``pare demo``) builds a plain JSON-ready *record* of a run and hands it to
:func:`write_prune_report` or :func:`write_demo_report`; the same functions serve library users. Plots need
matplotlib (the ``plot`` extra); without it the report says that plots were skipped and why, and everything
else is still written. Nothing here imports :mod:`pare.cli`.

Accuracy, fine-tuning and demo-row fields are read through the typed views of :mod:`pare.records`. Record
fields used here (all optional unless noted): ``command`` (the exact command line), ``provenance``
(:func:`provenance`), ``counts_before`` / ``counts_after`` (:meth:`pare.Counts.to_dict`), ``reduction``,
``layers`` (:func:`layer_rows`), ``accuracy``, ``latency``, ``seconds`` (wall time per phase), ``finetune``.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pare.count import Counts
from pare.io._atomic import atomic_write_bytes
from pare.records import Accuracy, DemoRow, FinetuneSummary

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.md"
ACCURACY_PLOT = "accuracy_vs_macs.png"
WIDTHS_PLOT = "layer_widths.png"


# ------------------------------------------------------------------------------------------------ records
def provenance(
    *,
    seed: int | None,
    data: str | None,
    convention: str,
    command: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Who/what/where of a run: pare and torch versions, git commit (None outside a checkout), python, seed,
    data path, counting convention and the command line."""
    from pare.io.artifact import build_provenance

    record = build_provenance()
    record.pop("source_sha256", None)
    record.update(
        {
            "platform": platform.platform(terse=True),
            "torch_threads": torch.get_num_threads(),
            "seed": seed,
            "data": data,
            "counter_convention": convention,
            "command": command,
        }
    )
    record.update(dict(extra or {}))
    return record


def layer_widths(counts: Counts) -> dict[str, int]:
    """Output width per conv/linear layer path (in forward order) of a :func:`pare.count` result."""
    return {
        layer.path: int(layer.out_channels)
        for layer in counts.layers
        if layer.kind in ("conv", "linear") and layer.out_channels is not None
    }


def layer_rows(after: Counts, before: Counts | None = None) -> list[dict[str, Any]]:
    """One row per conv/linear/BN layer of ``after``: path, type, kind, in/out channels, per-image MACs and
    params; with ``before`` (same layer paths, the dense model) also the ``*_before`` columns.

    Layers of ``after`` absent from ``before`` get None before-columns; pruning keeps every layer, so this
    only happens when two unrelated models are compared.
    """
    previous = {layer.path: layer for layer in before.layers} if before is not None else {}
    rows = []
    for layer in after.layers:
        if layer.kind not in ("conv", "linear", "bn"):
            continue
        row: dict[str, Any] = {
            "path": layer.path,
            "type": layer.type,
            "kind": layer.kind,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "macs": layer.macs,
            "params": layer.params,
        }
        if before is not None:
            old = previous.get(layer.path)
            row.update(
                {
                    "in_channels_before": old.in_channels if old else None,
                    "out_channels_before": old.out_channels if old else None,
                    "macs_before": old.macs if old else None,
                    "params_before": old.params if old else None,
                }
            )
        rows.append(row)
    return rows


def write_json(path: str | Path, record: Any) -> Path:
    """Write ``record`` as indented JSON, atomically (NaN/inf are refused: they are not JSON)."""
    text = json.dumps(record, indent=2, sort_keys=False, allow_nan=False, default=_json_default)
    return atomic_write_bytes(path, (text + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# --------------------------------------------------------------------------------------------- formatting
def human(n: float | int | None) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction printed as percent (0.9163 -> '91.63%'), or '-'."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _width(before: Any, after: Any) -> str:
    if before is None or before == after:
        return str(after)
    return f"{before} → {after}"


# ------------------------------------------------------------------------------------------------- plots
def plotting_unavailable() -> str | None:
    """None when matplotlib can draw PNGs, else the reason (for the report)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); install the plot extra: pip install 'pare[plot]'"
    return None


def _figure(width: float, height: float) -> Any:
    # A Figure with an Agg canvas directly: no pyplot, so no global backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_accuracy_vs_macs(points: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Top-1 accuracy (%) against MACs per image, one point per entry (left), and the same accuracies as bars
    (right), since pruned models at one budget share nearly the same MACs and their points overlap.

    ``points``: dicts with ``name``, ``macs`` and ``top1`` (fraction, plotted in percent); optional
    ``top1_before_finetune`` adds a hollow marker (left) and a lighter bar (right).
    """
    markers = "os^vD<>pPX*h"
    figure = _figure(11.0, 4.6)
    scatter, bars = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for index, point in enumerate(points):
        macs = float(point["macs"]) / 1e6
        color = f"C{index % 10}"
        marker = markers[index % len(markers)]
        scatter.scatter([macs], [100 * point["top1"]], s=40, color=color, marker=marker, label=str(point["name"]),
                        zorder=3)
        before = point.get("top1_before_finetune")
        if before is not None:
            before = 100 * before
            scatter.scatter([macs], [before], s=34, facecolors="none", edgecolors=color, marker=marker, zorder=2)
            bars.bar(index - 0.2, before, width=0.4, color=color, alpha=0.35)
        bars.bar(index + (0.2 if before is not None else 0.0), 100 * point["top1"], width=0.4, color=color)
    scatter.set_xlabel("MACs per image (millions)")
    scatter.set_ylabel("top-1 test accuracy (%)")
    scatter.set_title(title or "Accuracy vs MACs")
    scatter.grid(True, alpha=0.3)
    scatter.legend(fontsize=7, ncol=2, title="filled: fine-tuned, hollow: before", title_fontsize=7)
    bars.set_xticks(range(len(points)))
    bars.set_xticklabels([str(p["name"]) for p in points], rotation=45, ha="right", fontsize=8)
    bars.set_ylabel("top-1 test accuracy (%)")
    bars.set_title("light: pruned, before fine-tuning; dark: fine-tuned")
    bars.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_layer_widths(series: Mapping[str, Mapping[str, int]], path: str | Path, *, title: str = "") -> Path:
    """Per-layer output widths, one line per model in ``series`` (name -> {layer path: width}).

    The layers (x axis) are those of the first series, in its order; the first series is conventionally the
    dense model.
    """
    names = list(series)
    layers = list(series[names[0]]) if names else []
    figure = _figure(max(6.0, 0.45 * len(layers) + 2.5), 4.6)
    axes = figure.add_subplot(1, 1, 1)
    xs = list(range(len(layers)))
    for index, name in enumerate(names):
        ys = [series[name].get(layer, math.nan) for layer in layers]
        style = {"linewidth": 2.2, "color": "black"} if index == 0 else {"linewidth": 1.0, "marker": "o",
                                                                          "markersize": 3}
        axes.plot(xs, ys, label=name, **style)
    axes.set_xticks(xs)
    axes.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("output channels")
    axes.set_title(title or "Per-layer widths")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


# ----------------------------------------------------------------------------------------- report writers
def _provenance_section(record: Mapping[str, Any]) -> list[str]:
    prov = record.get("provenance") or {}
    lines = ["## Provenance", ""]
    if record.get("command"):
        lines += ["Command line:", "", "```", str(record["command"]), "```", ""]
    keys = ("pare_version", "git_commit", "torch_version", "python_version", "platform", "torch_threads",
            "seed", "data", "counter_convention", "created_utc")
    lines.append(markdown_table(["field", "value"], [[k, f"`{prov.get(k)}`"] for k in keys if k in prov]))
    return [*lines, ""]


def _seconds_section(seconds: Mapping[str, float]) -> list[str]:
    rows = [[phase, f"{value:.2f} s"] for phase, value in seconds.items()]
    return ["## Time per phase", "", markdown_table(["phase", "wall time"], rows), ""]


def _plots_section(plots: Sequence[str], skipped: str | None) -> list[str]:
    lines = ["## Plots", ""]
    if skipped:
        lines.append(f"Plots were skipped: {skipped}.")
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    return [*lines, ""]


def _latency_cell(lat: Mapping[str, Any] | None) -> str:
    if not lat:
        return "-"
    return f"{lat['median_ms']:.3f} ms (IQR {lat['iqr_ms']:.3f})"


def prune_markdown(record: Mapping[str, Any]) -> str:
    """report.md text of one ``pare prune`` run (see the module docstring for the record fields)."""
    before, after = record.get("counts_before") or {}, record.get("counts_after") or {}
    red = record.get("reduction") or {}
    lines = [f"# pare prune report: {record.get('model', {}).get('name', 'model')}", ""]
    lines += [
        f"Criterion **{record.get('criterion')}**, budget `{record.get('budget')}`, allocation "
        f"`{record.get('allocation')}`, residual mode `{record.get('residual_mode')}`. "
        f"{record.get('removed_channels', 0)} channels removed from {record.get('groups_pruned', 0)} groups. "
        f"Counts are per image under the `{before.get('convention', '?')}` convention.",
        "",
    ]
    for note in record.get("notes") or []:
        lines.append(f"- note: {note}")
    lines += ["## Counts", ""]
    rows = []
    for key in ("macs", "params", "params_no_bn_affine"):
        if key in before and key in after:
            reduction = red.get(f"{key}_reduction")
            rows.append([key, f"{before[key]:,}", f"{after[key]:,}",
                         "-" if reduction is None else f"{100 * reduction:.2f}%"])
    lines += [markdown_table(["count", "before", "after", "reduction"], rows), ""]
    if red.get("speedup"):
        lines += [f"Theoretical speed-up (MACs ratio): {red['speedup']:.2f}x", ""]
    accuracy = {name: Accuracy.from_record(v) for name, v in (record.get("accuracy") or {}).items()}
    if accuracy:
        lines += ["## Accuracy", "", markdown_table(
            ["model", "top-1", "top-5", "test images"],
            [[name, pct(a.top1), pct(a.top5), a.n] for name, a in accuracy.items()],
        ), ""]
        if record.get("finetune"):
            ft = FinetuneSummary.from_record(record["finetune"])
            lines += [
                f"Fine-tuned with recipe `{ft.recipe}` for {ft.epochs_completed} epoch(s); model selection on a "
                f"held-out validation split of {ft.val_images} training images (best val {pct(ft.best_val_top1)} "
                f"at epoch {ft.best_val_epoch}); the test accuracy reported is that of the final-epoch weights.",
                "",
            ]
    latency = record.get("latency") or {}
    if latency:
        lines += ["## Latency", ""]
        rows = [[name, _latency_cell(lat), lat.get("backend") if lat else "-", lat.get("batch_size") if lat else "-",
                 lat.get("threads") if lat else "-", lat.get("runs") if lat else "-"] for name, lat in latency.items()]
        lines += [markdown_table(["model", "median", "backend", "batch", "threads", "runs"], rows), ""]
        if record.get("latency_note"):
            lines += [str(record["latency_note"]), ""]
    layers = record.get("layers") or []
    if layers:
        lines += ["## Per-layer widths", ""]
        rows = [[f"`{r['path']}`", r["type"], _width(r.get("in_channels_before"), r["in_channels"]),
                 _width(r.get("out_channels_before"), r["out_channels"]),
                 _width(human(r.get("macs_before")) if r.get("macs_before") is not None else None, human(r["macs"])),
                 _width(r.get("params_before"), r["params"])]
                for r in layers if r["kind"] != "bn"]
        lines += [markdown_table(["layer", "type", "in", "out", "MACs", "params"], rows), ""]
    if record.get("seconds"):
        lines += _seconds_section(record["seconds"])
    lines += _plots_section(record.get("plots") or [], record.get("plots_skipped"))
    lines += _provenance_section(record)
    return "\n".join(lines)


def demo_markdown(record: Mapping[str, Any]) -> str:
    """report.md text of ``pare demo``: one row per criterion plus the dense baseline."""
    lines = ["# pare demo report", ""]
    setup = record.get("setup") or {}
    lines += [
        f"Data: {setup.get('data')} ({setup.get('train_images')} training images of which "
        f"{setup.get('val_images')} held out for validation, {setup.get('test_images')} test images). "
        f"Model: `{setup.get('model')}` trained {setup.get('epochs')} epochs from scratch. Every criterion prunes "
        f"a copy of it to a {100 * float(setup.get('target_macs_reduction', 0)):.0f}% MACs reduction "
        f"(`pare.prune`, global allocation; data-driven criteria score on {setup.get('calib_images')} calibration "
        "images from the training split, and BN statistics are recalibrated on them for every criterion), then "
        f"is fine-tuned {setup.get('finetune_epochs')} epochs with the same recipe. Accuracies are top-1 on the "
        "test split; after fine-tuning they are the final-epoch weights' (the validation split only monitors). "
        f"Latency: median of interleaved runs, batch {setup.get('latency_batch')}, "
        f"{setup.get('latency_threads')} thread(s), PyTorch eager.",
        "",
    ]
    rows = []
    for row in (DemoRow.from_record(r) for r in record.get("rows") or []):
        rows.append([
            f"**{row.name}**" if row.name == "dense" else row.name,
            pct(row.top1_before_finetune),
            pct(row.top1),
            human(row.macs),
            "-" if row.macs_reduction is None else f"{100 * row.macs_reduction:.1f}%",
            human(row.params),
            "-" if row.latency_ms is None else f"{row.latency_ms:.3f} ms",
            "-" if row.seconds is None else f"{row.seconds:.1f} s",
        ])
    lines += [markdown_table(["criterion", "top-1 pruned", "top-1 fine-tuned", "MACs", "MACs cut", "params",
                              "latency (median)", "time"], rows), ""]
    for note in record.get("notes") or []:
        lines.append(f"- {note}")
    if record.get("notes"):
        lines.append("")
    widths = record.get("widths") or {}
    if widths:
        names = list(widths)
        layers = list(widths[names[0]])
        lines += ["## Per-layer widths", "", markdown_table(
            ["layer", *names], [[f"`{layer}`", *[widths[n].get(layer) for n in names]] for layer in layers]
        ), ""]
    if record.get("seconds"):
        lines += _seconds_section(record["seconds"])
    lines += _plots_section(record.get("plots") or [], record.get("plots_skipped"))
    lines += _provenance_section(record)
    return "\n".join(lines)


def _draw(out_dir: Path, record: dict[str, Any], drawings: Sequence[tuple[str, Any]]) -> None:
    """Run each (file name, callable(path)) and record the plots written, or why they were skipped."""
    reason = plotting_unavailable()
    record["plots"] = []
    record["plots_skipped"] = reason
    if reason is not None:
        return
    for name, draw in drawings:
        draw(out_dir / name)
        record["plots"].append(name)


def write_prune_report(out_dir: str | Path, record: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and (with matplotlib) ``layer_widths.png`` into ``out_dir``.

    ``record`` gains ``plots`` (file names written) and ``plots_skipped`` (None or the reason). Returns the
    paths written by name.
    """
    out = Path(out_dir)
    layers = [r for r in record.get("layers") or [] if r["kind"] in ("conv", "linear")]
    drawings = []
    if layers and any(r.get("out_channels_before") is not None for r in layers):
        series = {
            "before": {r["path"]: r["out_channels_before"] for r in layers},
            "after": {r["path"]: r["out_channels"] for r in layers},
        }
        drawings.append((WIDTHS_PLOT, lambda p: plot_layer_widths(series, p, title="Per-layer widths")))
    _draw(out, record, drawings)
    paths = {"metrics": write_json(out / METRICS_NAME, record)}
    paths["report"] = atomic_write_bytes(out / REPORT_NAME, prune_markdown(record).encode())
    paths.update({name: out / name for name in record["plots"]})
    return paths


def write_demo_report(out_dir: str | Path, record: dict[str, Any]) -> dict[str, Path]:
    """Write the demo's ``metrics.json``, ``report.md``, ``accuracy_vs_macs.png`` and ``layer_widths.png``.

    ``record["rows"]``: one dict per model (``name``, ``macs``, ``params``, ``top1``, optional
    ``top1_before_finetune``, ``latency``); ``record["widths"]``: name -> {layer: width}, dense first.
    """
    out = Path(out_dir)
    rows = record.get("rows") or []
    widths = record.get("widths") or {}
    drawings = [
        (ACCURACY_PLOT, lambda p: plot_accuracy_vs_macs(rows, p, title="Demo: top-1 vs MACs per criterion")),
        (WIDTHS_PLOT, lambda p: plot_layer_widths(widths, p, title="Demo: per-layer widths (dense: black)")),
    ]
    _draw(out, record, drawings if rows and widths else [])
    paths = {"metrics": write_json(out / METRICS_NAME, record)}
    paths["report"] = atomic_write_bytes(out / REPORT_NAME, demo_markdown(record).encode())
    paths.update({name: out / name for name in record["plots"]})
    return paths
