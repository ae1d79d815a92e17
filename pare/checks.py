"""Checks of a model before pare works on it: finite weights, and an input size the model accepts.

They turn what would surface later as a confusing failure (a verification mismatch at some graph node, a
convolution's channel error, an accuracy of 10% with a NaN loss) into one message naming the cause
(this project's design, issue #11).
"""

from __future__ import annotations

import torch
from torch import nn

from pare.errors import ConfigError, PruneError


def first_nonfinite_tensor(model: nn.Module) -> str | None:
    """Dotted name of the first parameter or buffer (in ``named_parameters`` then ``named_buffers`` order)
    holding a NaN or an infinity, or None. Integer buffers (batch counters) cannot and are skipped."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Refuse a model with non-finite weights.

    Raises:
        PruneError: naming the first parameter/buffer with a NaN or infinity.
    """
    name = first_nonfinite_tensor(model)
    if name is not None:
        raise PruneError(f"{what} has non-finite weights (NaN or infinity), first in '{name}'; "
                         "it cannot be pruned, exported or repaired meaningfully")


def check_input_size(model: nn.Module, example: torch.Tensor) -> None:
    """Run ``model`` once on ``example`` (shape (N, C, H, W)) in eval mode, without gradients and with every
    module's training flag restored afterwards, so a wrong input size is reported as such.

    Raises:
        ConfigError: the model fails on an input of this size (message: the size and the model's complaint).
    """
    flags = [(module, module.training) for module in model.modules()]
    size = "x".join(str(n) for n in example.shape[1:])
    try:
        with torch.no_grad():
            model.eval()(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"input size {size} does not fit the model ({type(exc).__name__}: {reason}); "
                          "check --input-size (channels x height x width)") from None
    finally:
        for module, training in flags:
            module.training = training


def check_given_input_size(size: tuple[int, ...], model: nn.Module | None = None,
                           data_shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """A user-given input size (C, H, W) must equal the data's image shape (when there is data) and fit the
    model (when there is one: :func:`check_input_size` on seeded random images).

    Raises:
        ConfigError: naming both sizes, or the model's complaint.
    """
    text = "x".join(map(str, size))
    if data_shape is not None and tuple(int(n) for n in data_shape) != tuple(size):
        raise ConfigError(f"--input-size {text} does not match the data's images "
                          f"({'x'.join(str(int(n)) for n in data_shape)})")
    if model is not None:
        generator = torch.Generator().manual_seed(0)
        check_input_size(model, torch.randn((1, *size), generator=generator))


def report_eval_inputs(model: nn.Module, given: tuple[int, ...] | None, data_shape: tuple[int, ...]) -> None:
    """Before an evaluation: an --input-size must match the data (ConfigError), and a model with non-finite
    weights gets one ``pare: warning:`` line on stderr (its accuracy is still measured: that is the question
    an evaluation answers, but the number means little)."""
    import sys

    if given is not None:
        check_given_input_size(given, None, data_shape)
    name = first_nonfinite_tensor(model)
    if name is not None:
        print(f"pare: warning: the model has non-finite weights (NaN or infinity), first in '{name}'; "
              "its accuracy is not meaningful", file=sys.stderr)
