"""Rebuild records for zoo models after pruning: ``current_spec(model) -> {"name": ..., "kwargs": ...}``.

``create`` stores how a model was built in ``model.pare_zoo``. Pruning changes conv widths (and, for
option-A CIFAR ResNets, shortcut pads) in place, so that record no longer describes the model.
:func:`current_spec` reads the current widths back into the families' ``widths=`` / ``shortcut_pads=`` /
``classifier_width=`` options and checks, on a meta-device skeleton, that
``create(spec["name"], **spec["kwargs"])`` has exactly the model's state_dict keys and shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pare.errors import ConfigError
from pare.layers import ZeroPadShortcut
from pare.models.cifar_resnet import CifarResNet
from pare.models.imagenet_resnet import ImageNetResNet
from pare.models.registry import create
from pare.models.vgg_cifar import VGG16BNCifar


def _cifar_resnet_options(model: CifarResNet) -> dict[str, Any]:
    widths = [model.conv1.out_channels]
    pads: list[list[int] | None] = []
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            widths.extend([block.conv1.out_channels, block.conv2.out_channels])
            shortcut = block.shortcut
            pads.append(
                [shortcut.pad_front, shortcut.pad_back] if isinstance(shortcut, ZeroPadShortcut) else None
            )
    options: dict[str, Any] = {"widths": widths}
    if model.option == "A":
        options["shortcut_pads"] = pads
    return options


def _vgg_options(model: VGG16BNCifar) -> dict[str, Any]:
    widths = [module.out_channels for module in model.features if isinstance(module, nn.Conv2d)]
    return {"widths": widths, "classifier_width": model.classifier.linear1.out_features}


def _imagenet_resnet_options(model: ImageNetResNet) -> dict[str, Any]:
    widths = [model.conv1.out_channels]
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            convs = ("conv1", "conv2", "conv3") if hasattr(block, "conv3") else ("conv1", "conv2")
            widths.extend(getattr(block, conv).out_channels for conv in convs)
    return {"widths": widths}


def _options_from_modules(model: nn.Module) -> dict[str, Any] | None:
    """Width options read from the modules, or ``None`` for families without a ``widths=`` option."""
    if isinstance(model, CifarResNet):
        return _cifar_resnet_options(model)
    if isinstance(model, VGG16BNCifar):
        return _vgg_options(model)
    if isinstance(model, ImageNetResNet):
        return _imagenet_resnet_options(model)
    return None


def current_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "kwargs"}`` that rebuilds ``model``'s current (possibly pruned) skeleton with ``create``.

    Families with a ``widths=`` option get their widths read from the modules (``sparsity`` becomes ``None``);
    other families keep their ``pare_zoo`` record. Either way the result is verified against the model's
    state_dict shapes; :class:`ConfigError` names the first mismatch (e.g. a pruned MobileNetV2, which has no
    widths option).
    """
    record = getattr(model, "pare_zoo", None)
    if not isinstance(record, dict) or "name" not in record or not isinstance(record.get("kwargs"), dict):
        raise ConfigError(
            f"{type(model).__name__} has no pare_zoo record; it was not built by pare.models.create"
        )
    name = str(record["name"])
    kwargs = dict(record["kwargs"])
    options = _options_from_modules(model)
    if options is not None:
        kwargs.update(options)
        kwargs["sparsity"] = None
    with torch.device("meta"):
        skeleton = create(name, **kwargs)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rebuilt = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if expected != rebuilt:
        differing = sorted(set(expected) ^ set(rebuilt)) or sorted(
            key for key in expected if expected[key] != rebuilt[key]
        )
        key = differing[0]
        raise ConfigError(
            f"{name}: cannot rebuild this model from its options: {key!r} is "
            f"{expected.get(key, 'absent')} in the model but {rebuilt.get(key, 'absent')} in the rebuild"
        )
    return {"name": name, "kwargs": kwargs}
