"""Typed, frozen configuration of one pipeline run (:func:`pare.pipeline.run`) and of :func:`pare.prune`.

Every section is a frozen dataclass validated once, at construction; a bad value raises one
:class:`~pare.errors.ConfigError` line naming the key (``prune.allocation: unknown 'greedy'; choose from ...``).
``to_dict`` gives JSON-ready primitives and ``from_dict`` reads them back (unknown keys are errors, with a
did-you-mean), so a configuration is serialised into every report and result file and replayed with
``pare run --config row.json``. Fractions everywhere (a budget of 0.5 removes half); source: this project's
design (issue #14).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from pare.allocate.budget import Budget
from pare.allocate.dispatch import ALLOCATIONS
from pare.errors import BudgetError, ConfigError
from pare.train.recipe import Recipe

# A JSON value as read from a configuration file.
JSON = str | int | float | bool | None | list["JSON"] | dict[str, "JSON"]

ENGINES = ("pare", "torch-pruning")

# pare's default pipeline, chosen on validation splits held out from the CIFAR-10 training images (ResNet-20 and
# ResNet-56, 50% fewer MACs; `python bench/accuracy.py choose` -> bench/results/accuracy_choice.json, "choice"; a
# test keeps the two equal). Without calibration data the data-driven parts cannot run: then the criterion is l1,
# the allocation global and nothing is repaired.
DEFAULT_PIPELINE: dict[str, JSON] = {"criterion": "l1", "allocation": "sensitivity", "internal_only": True,
                                     "repair": "bn-recal+compensate"}
DATA_FREE_DEFAULTS: dict[str, str] = {"criterion": "l1", "allocation": "global"}


def default_criterion(has_data: bool) -> str:
    """The criterion ``"auto"`` stands for (see :data:`DEFAULT_PIPELINE`)."""
    return str(DEFAULT_PIPELINE["criterion"]) if has_data else DATA_FREE_DEFAULTS["criterion"]


def default_allocation(has_data: bool) -> str:
    """The allocation ``"auto"`` stands for (see :data:`DEFAULT_PIPELINE`)."""
    return str(DEFAULT_PIPELINE["allocation"]) if has_data else DATA_FREE_DEFAULTS["allocation"]
NORMALIZE = ("mean", "max", "l2", "none")
AGGREGATES = ("sum", "mean", "max", "first")
CONVENTIONS = ("macs", "chip")
COUPLED = ("min", "max", "first")
COMPENSATE_METHODS = ("sequential", "independent")
AUGMENTS = ("cifar", "none", "auto")
# Named evaluation splits: "val" is held out from the training images (seeded), "test" is the data set's test
# split; any other name must be given a path in DataConfig.test_sets (e.g. lossless932, jpeg_test).
BUILTIN_SPLITS = ("val", "test")


def _fail(where: str, message: str) -> None:
    raise ConfigError(f"{where}: {message}")


def _choice(where: str, value: str, choices: typing.Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        _fail(where, f"unknown {value!r}; choose from {', '.join(options)}{hint}")


def _int(where: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(where, f"must be an int >= {low}, got {value!r}")


def _fraction(where: str, value: float, *, closed_high: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or value > 1 or (value == 1 and not closed_high):
        _fail(where, f"must be a fraction in [0, 1{']' if closed_high else ')'}, got {value!r}")


def _bool(where: str, value: bool) -> None:
    if not isinstance(value, bool):
        _fail(where, f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune, beside the criterion and the budget (which :func:`pare.prune` takes as arguments).

    ``engine``: ``"pare"`` (traced groups, verified surgery) or ``"torch-pruning"`` (Torch-Pruning, optional
    dependency, :mod:`pare.baselines.torch_pruning`). ``allocation``: a name of
    :data:`pare.allocate.dispatch.ALLOCATIONS`. ``aggregate``: how coupled members' scores combine.
    ``normalize``: per-group score scaling of the global ranking. ``min_channels``, ``round_to``,
    ``protected``, ``internal_only``: :class:`pare.allocate.Constraints` (``internal_only`` None, the default:
    block-internal channels only when the model has any, as :data:`DEFAULT_PIPELINE` chose; else every prunable
    group). ``allocation`` "auto" (the default): :func:`default_allocation`. ``verify``: check the surgery against
    the masked original. ``reset_bn``: reset the norm layers of pruned groups (CHIP CIFAR code, methods.md
    §1.7). ``seed``: criterion and compensation sampling. ``convention``: MACs counting convention.
    ``tolerance``: accepted distance to a MACs/params target (fraction). ``coupled``: sparsity strings on
    coupled residual groups. ``model_name``: zoo name for sparsity strings on models not built by
    :func:`pare.models.create`. ``steps``: prune in this many equal steps (iterative pruning; the pipeline
    repairs and calls the recovery callback between steps).
    """

    engine: str = "pare"
    allocation: str = "auto"
    aggregate: str = "sum"
    normalize: str = "mean"
    min_channels: int = 1
    round_to: int = 1
    protected: tuple[str, ...] = ()
    internal_only: bool | None = None
    verify: bool = True
    reset_bn: bool = False
    seed: int = 0
    convention: str = "macs"
    tolerance: float = 0.005
    coupled: str = "min"
    model_name: str | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "protected", (self.protected,) if isinstance(self.protected, str)
                           else tuple(self.protected))
        _choice("prune.engine", self.engine, ENGINES)
        _choice("prune.allocation", self.allocation, (*ALLOCATIONS, "auto"))
        _choice("prune.aggregate", self.aggregate, AGGREGATES)
        _choice("prune.normalize", self.normalize, NORMALIZE)
        _int("prune.min_channels", self.min_channels, 1)
        _int("prune.round_to", self.round_to, 1)
        _int("prune.seed", self.seed, -(2**63))
        _int("prune.steps", self.steps, 1)
        if self.internal_only is not None:
            _bool("prune.internal_only", self.internal_only)
        _bool("prune.verify", self.verify)
        _bool("prune.reset_bn", self.reset_bn)
        _choice("prune.convention", self.convention, CONVENTIONS)
        _choice("prune.coupled", self.coupled, COUPLED)
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance < 1):
            _fail("prune.tolerance", f"must be in (0, 1), got {self.tolerance!r}")


@dataclass(frozen=True)
class RepairConfig:
    """Repairs applied to the pruned model on calibration data (:func:`pare.repair.repair`), in this order.

    ``recalibrate``: BatchNorm statistics re-estimated on the calibration batches (first
    ``recalibrate_batches`` of them; None = all). ``compensate``: least-squares refit of the layers that lost
    input channels (:func:`pare.compensate.compensate`, ``compensate_method``), after the recalibration so the
    fit sees the inputs of the recalibrated model. None (the default) = on when calibration data are given: the
    validation-chosen default pipeline (:data:`DEFAULT_PIPELINE`); :meth:`resolved` turns None into a bool.
    """

    recalibrate: bool | None = None
    recalibrate_batches: int | None = None
    compensate: bool | None = None
    compensate_method: str = "sequential"

    def __post_init__(self) -> None:
        if self.recalibrate is not None:
            _bool("repair.recalibrate", self.recalibrate)
        if self.compensate is not None:
            _bool("repair.compensate", self.compensate)
        if self.recalibrate_batches is not None:
            _int("repair.recalibrate_batches", self.recalibrate_batches, 1)
        _choice("repair.compensate_method", self.compensate_method, COMPENSATE_METHODS)

    @property
    def active(self) -> bool:
        """Whether a repair may run (an automatic one counts: it runs when data are given)."""
        return self.recalibrate is not False or self.compensate is not False

    def resolved(self, has_data: bool) -> RepairConfig:
        """None ("when data are given") made explicit."""
        return dataclasses.replace(
            self,
            recalibrate=has_data if self.recalibrate is None else self.recalibrate,
            compensate=has_data if self.compensate is None else self.compensate,
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the pruned model (:func:`pare.train.fit`) on the training images minus ``val``.

    ``recipe``: the optimisation settings. ``distill``: the dense model is the teacher (weight
    ``recipe.distill_alpha``). ``augment``: ``"auto"`` = CIFAR crop+flip for colour images of at least 32 px,
    none otherwise. ``keep_best``: end with the best-on-validation weights instead of the final epoch's.
    """

    recipe: Recipe = field(default_factory=Recipe)
    distill: bool = False
    augment: str = "auto"
    keep_best: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.recipe, Mapping):
            object.__setattr__(self, "recipe", Recipe.from_dict(dict(self.recipe)))
        if not isinstance(self.recipe, Recipe):
            _fail("finetune.recipe", f"must be a Recipe or a mapping, got {type(self.recipe).__name__}")
        _bool("finetune.distill", self.distill)
        _bool("finetune.keep_best", self.keep_best)
        _choice("finetune.augment", self.augment, AUGMENTS)
        if self.distill and self.recipe.distill_alpha == 0:
            _fail("finetune.distill", "needs recipe.distill_alpha > 0")


@dataclass(frozen=True)
class EvalConfig:
    """Which named splits are evaluated (top-1/top-5 fractions, mean loss) and when.

    ``splits``: ``"val"``, ``"test"`` or names of :attr:`DataConfig.test_sets`. ``dense``: also evaluate the
    model before pruning. ``batch_size``: evaluation batch.
    """

    splits: tuple[str, ...] = ("test",)
    dense: bool = True
    batch_size: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", (self.splits,) if isinstance(self.splits, str) else tuple(self.splits))
        if len(set(self.splits)) != len(self.splits):
            _fail("eval.splits", f"lists a split twice: {list(self.splits)}")
        _bool("eval.dense", self.dense)
        _int("eval.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split.

    ``path``: a data set path or name (``"digits"``, see :func:`pare.data.load_dataset`); None = no data.
    ``test_sets``: extra named evaluation sets, name -> path (``$PARE_SHARED`` is expanded), e.g.
    ``{"lossless932": "$PARE_SHARED/data/cifar10_official_truncated/cifar10_lossless_subset.npz"}``.
    ``val_fraction``: share of the training images held out (seeded) as ``val``; fine-tuning and calibration
    use the rest. ``calib_images``/``calib_batch_size``: the seeded calibration sample. ``normalization``:
    a preset name of :data:`pare.data.NORMALIZATION`; None = the artifact's recorded one, else the model
    family's preprocessing (:class:`pare.models.registry.Preprocessing`). ``mean``/``std``: per-channel
    overrides of it (both or neither). ``seed``: split and calibration sample.
    """

    path: str | None = None
    test_sets: Mapping[str, str] = field(default_factory=dict)
    val_fraction: float = 0.1
    calib_images: int = 512
    calib_batch_size: int = 256
    normalization: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "test_sets", types.MappingProxyType(dict(self.test_sets)))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if (self.mean is None) != (self.std is None):
            _fail("data.mean", "mean and std override the normalization together; give both")
        for name in self.test_sets:
            if name in BUILTIN_SPLITS:
                _fail(f"data.test_sets.{name}", "is a built-in split name; choose another")
        _fraction("data.val_fraction", self.val_fraction)
        _int("data.calib_images", self.calib_images, 1)
        _int("data.calib_batch_size", self.calib_batch_size, 1)
        _int("data.seed", self.seed, -(2**63))


@dataclass(frozen=True)
class ModelConfig:
    """The dense model: a zoo name (``pare.models.create``) with options and a checkpoint, or a pare artifact.

    ``name``: zoo name, or a path to a pare artifact (then ``weights`` must be None). ``weights``: checkpoint
    file of a zoo model (``$PARE_SHARED`` is expanded). ``options``: extra constructor options.
    ``num_classes``: None = the data set's class count, else the family default. ``input_size``: (C, H, W) for
    tracing and counting; None = the data's image size, else the artifact's or the family's. ``init_seed``: seed of the
    initialisation (a zoo model without weights). ``train``: a recipe to train the dense model from its
    initialisation on the training images minus ``val`` before pruning (the demo), None = use as loaded.
    """

    name: str = "resnet56"
    weights: str | None = None
    options: Mapping[str, JSON] = field(default_factory=dict)
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    init_seed: int = 0
    train: Recipe | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
                _fail("model.input_size", f"must be [C, H, W] with positive ints, got {list(size)}")
            object.__setattr__(self, "input_size", size)
        if not isinstance(self.name, str) or not self.name:
            _fail("model.name", f"must be a zoo name or an artifact path, got {self.name!r}")
        if self.num_classes is not None:
            _int("model.num_classes", self.num_classes, 1)
        if isinstance(self.train, Mapping):
            object.__setattr__(self, "train", Recipe.from_dict(dict(self.train)))


@dataclass(frozen=True)
class LatencyConfig:
    """A measured-latency target (:func:`pare.prune_latency.prune_to_latency`) instead of a MACs budget:
    ``reduction`` = fraction of the dense model's latency on this device to remove, timed with ``runs`` runs
    per candidate on ``threads`` intra-op threads, batch 1."""

    reduction: float = 0.5
    runs: int = 30
    threads: int = 1

    def __post_init__(self) -> None:
        _fraction("latency.reduction", self.reduction)
        _int("latency.runs", self.runs, 1)
        _int("latency.threads", self.threads, 1)


@dataclass(frozen=True)
class PipelineConfig:
    """One run of :func:`pare.pipeline.run`: model, data, criterion and budget, pruning, repair, fine-tune,
    evaluation. ``criterion``/``criterion_options``: a registered criterion and its constructor options;
    ``"auto"`` = :data:`DEFAULT_PIPELINE`'s criterion when the run has calibration data, else its data-free one.
    ``target``: the budget (:class:`pare.allocate.Budget`; in JSON ``{"macs_reduction": 0.5}``).
    ``latency``: a measured-latency target replacing ``target`` (None = prune to ``target``).
    ``recovery``: a short fine-tune after every step of iterative pruning but the last (``prune.steps`` > 1).
    ``finetune``: None = no fine-tuning.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    criterion: str = "auto"
    criterion_options: Mapping[str, JSON] = field(default_factory=dict)
    target: Budget = field(default_factory=lambda: Budget(macs_reduction=0.5))
    prune: PruneConfig = field(default_factory=PruneConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    latency: LatencyConfig | None = None
    recovery: FinetuneConfig | None = None
    finetune: FinetuneConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion_options", types.MappingProxyType(dict(self.criterion_options)))
        if isinstance(self.target, Mapping):
            try:
                object.__setattr__(self, "target", Budget(**dict(self.target)))
            except (TypeError, BudgetError) as exc:
                _fail("target", str(exc))
        for split in self.eval.splits:
            if split not in BUILTIN_SPLITS and split not in self.data.test_sets:
                _fail("eval.splits", f"no split {split!r}: name it in data.test_sets or use val/test")
        if self.prune.engine == "torch-pruning" and self.target.kind != "macs_reduction":
            _fail("prune.engine", "torch-pruning takes a macs_reduction target only")
        if self.recovery is not None and self.prune.steps == 1:
            _fail("recovery", "recovers between the steps of iterative pruning; set prune.steps > 1")
        trains = self.finetune is not None or self.recovery is not None or self.model.train is not None
        if (trains or "val" in self.eval.splits) and self.data.val_fraction == 0:
            _fail("data.val_fraction", "training and the 'val' split need a validation share > 0")
        if self.latency is not None and (self.prune.steps > 1 or self.prune.engine != "pare"):
            _fail("latency", "a latency target is searched in one step with the pare engine")
        if self.prune.steps > 1 and self.target.kind == "sparsity":
            _fail("prune.steps", "a sparsity string is replayed in one step")

    def to_dict(self) -> dict[str, JSON]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, JSON]) -> PipelineConfig:
        return from_dict(cls, values)


Section = (ModelConfig | DataConfig | PruneConfig | RepairConfig | LatencyConfig | FinetuneConfig | EvalConfig
           | PipelineConfig)


def to_dict(config: Section) -> dict[str, JSON]:
    """JSON-ready primitives of a configuration dataclass (nested sections, recipes and budgets included)."""
    out: dict[str, JSON] = {}
    for f in dataclasses.fields(config):
        out[f.name] = _plain(getattr(config, f.name))
    return out


def _plain(value: object) -> JSON:
    if isinstance(value, Budget):
        return {value.kind: value.value}
    if isinstance(value, Recipe):
        return value.to_dict()  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value  # type: ignore[return-value]


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "prune": PruneConfig,
                              "repair": RepairConfig, "latency": LatencyConfig, "recovery": FinetuneConfig,
                              "finetune": FinetuneConfig, "eval": EvalConfig}
C = typing.TypeVar("C", bound=Section)


def from_dict(cls: type[C], values: Mapping[str, JSON], where: str = "") -> C:
    """Build ``cls`` from JSON primitives; an unknown key or a wrong type raises one ConfigError line."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"config: unknown key '{path}'{hint}")
        section = _SECTIONS.get(str(key)) if cls is PipelineConfig else None
        if section is not None and value is not None:
            value = from_dict(section, value, path)  # type: ignore[arg-type]
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[str(key)] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None
