"""pare's model zoo: ``create(name, num_classes=..., sparsity=..., **options)`` and ``list_models()``.

Families (one per module): CIFAR ResNets option A/B (``resnet20`` ... ``resnet110``, ``resnet20b`` ...), the
HRank/CHIP CIFAR VGG-16-BN (``vgg16_bn_cifar`` / ``vgg16``), ImageNet ResNet-18/34/50 and MobileNetV2 with
torchvision keys, a small CIFAR DenseNet (``densenet_cifar``) and the demo ``small_cnn``.
"""

from __future__ import annotations

from pare.models import (  # noqa: F401  (imported for their @register_model side effect)
    cifar_resnet,
    densenet_cifar,
    imagenet_resnet,
    mobilenet_v2,
    small_cnn,
    vgg_cifar,
)
from pare.models.registry import create, get_entry, list_models, register_model
from pare.models.sparsity import parse_sparsity
from pare.models.spec import current_spec

__all__ = [
    "create",
    "current_spec",
    "get_entry",
    "list_models",
    "parse_sparsity",
    "register_model",
]
