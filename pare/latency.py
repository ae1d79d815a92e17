"""Measured latency: warm-up, repeated timed runs, median and interquartile range.

MACs are a proxy; what a user feels is wall time on their device. :func:`measure_latency` times a model the way
a benchmark should: fixed thread count, warm-up runs excluded, many timed runs, robust statistics (median and
IQR rather than the mean, which one scheduler hiccup can dominate). Two back-ends: PyTorch eager and ONNX Runtime
(the ``onnx`` extra).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pare.errors import ConfigError, ExportError

BACKENDS = ("eager", "onnxruntime")


@dataclass(frozen=True)
class Latency:
    """One latency measurement. Times in milliseconds per forward pass of one batch."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    backend: str
    device: str

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["iqr_ms"] = self.iqr_ms
        return out


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=4, method="inclusive")
    return q[0], q[1], q[2]


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ConfigError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _as_tuple(example_inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _time_calls(call: Any, warmup: int, runs: int, sync: Any) -> list[float]:
    for _ in range(warmup):
        call()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def _eager_call(model: nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device) -> tuple[Any, Any]:
    inputs = tuple(t.to(device) for t in inputs)

    def call() -> None:
        with torch.inference_mode():
            model(*inputs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call, sync


def _onnx_call(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], threads: int, workdir: Path
) -> tuple[Any, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("backend 'onnxruntime' needs the onnx extra: pip install 'pare[onnx]'") from exc
    from pare.io import export_onnx

    path = workdir / "model.onnx"
    export_onnx(model, tuple(t.cpu() for t in inputs), path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {arg.name: t.cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}

    def call() -> None:
        session.run(None, feed)

    return call, lambda: None


def _check(backend: str, runs: int, warmup: int, device: torch.device) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown latency backend '{backend}'; choose from {', '.join(BACKENDS)}")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")


def _prepare(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], backend: str, n_threads: int, device: torch.device,
    workdir: Path,
) -> tuple[Any, Any, torch.device]:
    """(call, sync, device actually used) for one model; ONNX Runtime exports and loads the model here, once."""
    if backend == "eager":
        model_device = next((p.device for p in model.parameters()), device)
        if model_device != device:
            raise ConfigError(f"model is on {model_device} but latency was requested on {device}")
        call, sync = _eager_call(model, inputs, device)
        return call, sync, device
    call, sync = _onnx_call(model, inputs, n_threads, workdir)
    return call, sync, torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(models: list[nn.Module]) -> Iterator[None]:
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _stats(times: list[float], runs: int, warmup: int, batch_size: int, threads: int, backend: str,
           device: torch.device) -> Latency:
    q1, median, q3 = _quartiles(times)
    return Latency(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=min(times), runs=runs, warmup=warmup,
                   batch_size=batch_size, threads=threads, backend=backend, device=str(device))


def _batch_size(inputs: tuple[torch.Tensor, ...]) -> int:
    return int(inputs[0].shape[0]) if inputs[0].dim() else 1


def measure_latency(
    model: nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    backend: str = "eager",
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> Latency:
    """Time ``model(*example_inputs)`` and return median / quartiles in milliseconds.

    Args:
        model: evaluated in eval mode under ``torch.inference_mode`` (its training flag is restored).
        example_inputs: the batch to time, e.g. ``torch.randn(1, 3, 224, 224)`` for batch 1; its first dim is
            reported as the batch size.
        backend: ``"eager"`` (PyTorch) or ``"onnxruntime"`` (CPU execution provider, exported with
            :func:`pare.export_onnx`).
        warmup: untimed runs first (allocator, caches, lazy initialisation).
        runs: timed runs; statistics are over these.
        threads: intra-op threads for the measurement (restored afterwards); None keeps the current setting.
        device: where eager runs; ONNX Runtime always runs on CPU here.
    """
    device = torch.device(device)
    _check(backend, runs, warmup, device)
    inputs = _as_tuple(example_inputs)
    with _eval_mode([model]), _threads(threads) as n_threads, \
            tempfile.TemporaryDirectory(prefix="pare-latency-") as tmp:
        call, sync, used = _prepare(model, inputs, backend, n_threads, device, Path(tmp))
        times = _time_calls(call, warmup, runs, sync)
    return _stats(times, runs, warmup, _batch_size(inputs), n_threads, backend, used)


def compare_latency(
    models: dict[str, nn.Module],
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    rounds: int = 5,
    **kwargs: Any,
) -> dict[str, Latency]:
    """Measure several models in interleaved rounds so that drift in machine load hits all of them alike.

    Each round measures every model with ``runs // rounds`` timed runs (``runs`` from ``kwargs``, default 50;
    the other ``kwargs`` as in :func:`measure_latency`). Every model is prepared once (one ONNX export and
    session) and warmed up with ``warmup`` runs before the first round and 2 runs before each later one.
    The returned median and quartiles are those of the per-round medians (robust to one noisy round);
    ``min_ms`` is the fastest single run. Use this for speed-up ratios.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    unknown = set(kwargs) - {"runs", "warmup", "backend", "threads", "device"}
    if unknown:
        raise ConfigError(f"unknown compare_latency option(s): {', '.join(sorted(unknown))}")
    total = int(kwargs.get("runs", 50))
    warmup = int(kwargs.get("warmup", 10))
    backend = str(kwargs.get("backend", "eager"))
    device = torch.device(kwargs.get("device", "cpu"))
    _check(backend, total, warmup, device)
    per_round = max(1, total // rounds)
    inputs = _as_tuple(example_inputs)
    medians: dict[str, list[float]] = {name: [] for name in models}
    fastest: dict[str, float] = {name: float("inf") for name in models}
    with _eval_mode(list(models.values())), _threads(kwargs.get("threads")) as n_threads, \
            tempfile.TemporaryDirectory(prefix="pare-latency-") as tmp:
        prepared = {}
        for i, (name, model) in enumerate(models.items()):
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            prepared[name] = _prepare(model, inputs, backend, n_threads, device, workdir)
        for r in range(rounds):
            for name, (call, sync, _) in prepared.items():
                times = _time_calls(call, warmup if r == 0 else 2, per_round, sync)
                medians[name].append(statistics.median(times))
                fastest[name] = min(fastest[name], min(times))
    out = {}
    for name in models:
        q1, median, q3 = _quartiles(sorted(medians[name]))
        out[name] = Latency(median_ms=median, q1_ms=q1, q3_ms=q3, min_ms=fastest[name], runs=per_round * rounds,
                            warmup=warmup, batch_size=_batch_size(inputs), threads=n_threads, backend=backend,
                            device=str(prepared[name][2]))
    return out
