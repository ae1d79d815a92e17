"""The stages of :func:`pare.pipeline.run` that load things: data splits, the dense model, evaluation loaders.

Kept apart from the orchestration so that a caller that runs many configurations over the same data and model
(the demo, a benchmark) loads them once with the same functions the pipeline uses. Source: this project's design
(issue #14).
"""

from __future__ import annotations

import contextlib
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pare.config import JSON, DataConfig, EvalConfig, ModelConfig
from pare.data import (
    ImageDataset,
    ImageSubset,
    InMemoryLoader,
    Normalization,
    calibration_batches,
    load_dataset,
    train_val_split,
)
from pare.data.registry import KNOWN_NAMES
from pare.errors import CheckpointError, ConfigError, DataError, PareError
from pare.evaluate import evaluate
from pare.io import load, load_checkpoint, read_metadata, sha256_file
from pare.models import create, get_entry
from pare.train import Recipe, fit

Dataset = ImageDataset | ImageSubset
Batch = tuple[torch.Tensor, torch.Tensor]
JSONDict = dict[str, JSON]


def expand(path: str) -> str:
    """``$PARE_SHARED`` and ``~`` expanded, so that a recorded configuration is portable between checkouts."""
    return os.path.expanduser(os.path.expandvars(path))


def read_split(path: str, split: str) -> ImageDataset:
    """``pare.data.load_dataset(path, split)`` in memory; low-level read errors become one DataError line."""
    if path not in KNOWN_NAMES and not Path(expand(path)).exists():
        raise DataError(f"data {path}: no such file or folder (nor one of the names {', '.join(KNOWN_NAMES)})")
    try:
        dataset = load_dataset(expand(path), split)
    except PareError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        message = " ".join(str(exc).split())
        raise DataError(f"data {path}: cannot read the {split} split ({type(exc).__name__}: {message})") from exc
    if not isinstance(dataset, ImageDataset):
        raise DataError(f"data {path}: the {split} split is streamed from disk; the pipeline needs it in memory")
    return dataset


@dataclass
class Splits:
    """The data of one run. ``train``: training images minus ``val`` (fine-tuning, calibration); ``val``: the
    seeded held-out share of the training images (None when ``val_fraction`` is 0); ``tests``: evaluation sets
    by name ("test" and the configuration's ``test_sets``); ``calib``: the seeded calibration batches,
    normalised; ``normalization``: how uint8 images become inputs."""

    train: Dataset | None
    val: Dataset | None
    tests: dict[str, ImageDataset]
    calib: list[Batch] | None
    normalization: Normalization
    classes: int | None = None
    input_size: tuple[int, int, int] | None = None

    def split(self, name: str) -> Dataset:
        found = self.val if name == "val" else self.tests.get(name)
        if found is None:
            raise ConfigError(f"eval.splits: split {name!r} is not loaded (val_fraction 0, or no data)")
        return found


def load_data(config: DataConfig, normalization: Normalization, *, need_train: bool, calibrate: bool,
              splits: tuple[str, ...] = ("test",)) -> Splits:
    """Read the data set ``config.path`` (training split only when ``need_train``), hold out ``val``, draw the
    calibration sample (when ``calibrate``) and read the named evaluation ``splits``."""
    if config.path is None:
        if need_train or calibrate or splits:
            raise ConfigError("data.path is required (calibration, fine-tuning or evaluation needs images)")
        return Splits(None, None, {}, None, normalization)
    tests: dict[str, ImageDataset] = {}
    for name in splits:
        if name == "test":
            tests[name] = read_split(config.path, "test")
        elif name != "val":
            tests[name] = read_split(config.test_sets[name], "test")
    train = val = None
    calib = None
    if need_train or calibrate or "val" in splits:
        full = read_split(config.path, "train")
        train, val = full, None
        if config.val_fraction > 0:
            train_idx, val_idx = train_val_split(len(full), val_fraction=config.val_fraction, seed=config.seed)
            train, val = full.subset(train_idx), full.subset(val_idx)
    if calibrate and train is not None:
        if config.calib_images > len(train):
            raise DataError(f"data.calib_images {config.calib_images} is more than the {len(train)} training "
                            "images available")
        calib = calibration_batches(train, config.calib_images, min(config.calib_batch_size, config.calib_images),
                                    seed=config.seed, normalization=normalization)
    some = next(iter(tests.values()), train)
    classes = len(some.classes) if some is not None else None
    shape = tuple(int(v) for v in some.images.shape[1:]) if some is not None else None
    return Splits(train, val, tests, calib, normalization, classes, shape)  # type: ignore[arg-type]


def resolve_normalization(data: DataConfig, model: ModelConfig, recorded: JSONDict | None = None) -> Normalization:
    """``data.normalization`` when given, else the artifact's recorded one, else the model family's
    preprocessing (:class:`pare.models.registry.Preprocessing`)."""
    if data.normalization is not None or data.mean is not None:
        base = Normalization.preset(data.normalization or "none")
        if data.mean is None:
            return base
        return Normalization(f"{base.name}+custom", data.mean, data.std)
    if recorded:
        mean, std = recorded.get("mean"), recorded.get("std")
        return Normalization(str(recorded.get("name", "recorded")), tuple(mean) if mean else None,  # type: ignore[arg-type]
                             tuple(std) if std else None)  # type: ignore[arg-type]
    if is_artifact(model.name):
        raise ConfigError(f"model {model.name}: the artifact records no normalization; set data.normalization")
    return Normalization.preset(get_entry(model.name).preprocessing.normalization)


def is_artifact(spec: str) -> bool:
    """A model name denotes a file (pare artifact) when it exists or looks like a path."""
    path = expand(spec)
    return Path(path).exists() or os.sep in path or path.endswith((".safetensors", ".th", ".pt", ".pth"))


@dataclass
class LoadedModel:
    """The dense model and where it came from (``source``: "zoo" or "artifact"; ``provenance``: an artifact's
    recorded metadata, e.g. its normalization and input shape)."""

    model: nn.Module
    label: str
    source: str
    path: str | None = None
    sha256: str | None = None
    provenance: JSONDict = field(default_factory=dict)
    train_record: JSONDict | None = None

    def to_dict(self) -> JSONDict:
        return {"name": self.label, "source": self.source, "path": self.path, "sha256": self.sha256,
                "zoo": getattr(self.model, "pare_zoo", None)}

    @property
    def recorded_input_shape(self) -> tuple[int, int, int] | None:
        shape = self.provenance.get("input_shape")
        return tuple(int(v) for v in shape) if isinstance(shape, list) and len(shape) == 3 else None  # type: ignore[return-value]


def load_model(config: ModelConfig, num_classes: int | None = None) -> LoadedModel:
    """Build the zoo model (initialised under ``config.init_seed`` without touching the global RNG, then its
    checkpoint) or load the pare artifact ``config.name``. ``num_classes``: the data's class count, used when
    ``config.num_classes`` is None."""
    if is_artifact(config.name):
        path = Path(expand(config.name))
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file (give a pare artifact or a zoo model name)")
        if config.weights is not None:
            raise ConfigError("model.weights (--weights) cannot be combined with an artifact, which holds its own "
                              "weights")
        try:
            meta = read_metadata(path)
        except CheckpointError as exc:
            if str(exc).startswith(f"{path}: artifact "):  # a pare artifact that breaks the schema: no hint
                raise
            raise CheckpointError(f"{exc}; to load a checkpoint, give the zoo model name with its weights "
                                  f"(model.weights; on the command line --weights {path})") from None
        return LoadedModel(load(path), config.name, "artifact", str(path), sha256_file(path), meta["provenance"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = create(config.name, num_classes=config.num_classes or num_classes, **dict(config.options))
    loaded = LoadedModel(model, config.name, "zoo")
    if config.weights is not None:
        weights = expand(config.weights)
        if not Path(weights).is_file():
            raise CheckpointError(f"model.weights {config.weights}: no such checkpoint file")
        info = load_checkpoint(model, weights)
        loaded.path, loaded.sha256 = config.weights, info.get("sha256")  # type: ignore[assignment]
    return loaded


def default_augment(dataset: Dataset) -> str | None:
    """CIFAR-style crop+flip for colour images of at least 32x32; none for digits/MNIST (flips change digits)."""
    c, h, w = (int(v) for v in dataset[0][0].shape)
    return "cifar" if c == 3 and min(h, w) >= 32 else None


def train_loaders(recipe: Recipe, data: Splits, augment: str) -> tuple[InMemoryLoader, InMemoryLoader]:
    """(shuffled, augmented training loader, validation loader) for :func:`pare.train.fit`."""
    if data.train is None or data.val is None:
        raise ConfigError("training needs the training images and a validation share (data.val_fraction > 0)")
    aug = default_augment(data.train) if augment == "auto" else (None if augment == "none" else augment)
    train = InMemoryLoader(data.train, recipe.batch_size, shuffle=True, augment=aug,
                           normalization=data.normalization, seed=recipe.seed)
    val = InMemoryLoader(data.val, max(recipe.batch_size, 256), shuffle=False, normalization=data.normalization)
    return train, val


def train_dense(loaded: LoadedModel, recipe: Recipe, data: Splits, *, device: str, progress: bool) -> None:
    """Train the dense model in place from its initialisation (``ModelConfig.train``); the record goes into
    ``loaded.train_record`` (fractions)."""
    result = fit(loaded.model, *train_loaders(recipe, data, "auto"), recipe, device=device, progress=progress)
    loaded.model.to("cpu")
    loaded.train_record = {"recipe": recipe.to_dict(), "best_val_top1": result.best_val_acc,
                           "final_val_top1": result.final_val_acc, "seconds": result.seconds}


def evaluate_splits(model: nn.Module, data: Splits, config: EvalConfig, device: str) -> dict[str, JSONDict]:
    """Top-1/top-5 (fractions), mean loss and image count of ``model`` on every split of ``config``."""
    out: dict[str, JSONDict] = {}
    for name in config.splits:
        loader = InMemoryLoader(data.split(name), config.batch_size, shuffle=False, normalization=data.normalization)
        out[name] = dict(evaluate(model, loader, device=device))
    model.to("cpu")
    return out


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``n`` for the block (unchanged when None), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
