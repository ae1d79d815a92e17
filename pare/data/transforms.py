"""Transforms with torch ops only: normalisation presets, batch-wise CIFAR augmentation, and ImageNet-style
per-image random-resized-crop / resize / center-crop / flip for streamed folders."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pare.errors import ConfigError

# Per-channel (mean, std) applied after scaling uint8 to [0, 1]; "none" only scales by 1/255.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "none": None,
}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, rank, ...), well spread even for adjacent inputs."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU torch.Generator seeded by :func:`derive_seed` of ``parts``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(*parts))
    return gen


@dataclass(frozen=True)
class Normalization:
    """How uint8 images become model inputs: x / 255, then (x - mean) / std per channel (None: no shift).

    ``name``: the preset it came from (:data:`NORMALIZATION`), or "custom". Build it with :meth:`preset` or
    with explicit ``mean``/``std`` (one value per channel, std > 0).
    """

    name: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ConfigError("normalization: mean and std must be given together")
        if self.mean is not None and self.std is not None:
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
            if len(self.mean) != len(self.std):
                raise ConfigError(f"normalization: {len(self.mean)} mean values but {len(self.std)} std values")
            if any(v <= 0 for v in self.std):
                raise ConfigError(f"normalization std values must be > 0, got {list(self.std)}")

    @classmethod
    def preset(cls, name: str) -> Normalization:
        """The preset ``name`` of :data:`NORMALIZATION`; ConfigError for an unknown name."""
        if name not in NORMALIZATION:
            raise ConfigError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATION)}")
        stats = NORMALIZATION[name]
        return cls(name, *(stats if stats is not None else (None, None)))

    def to_dict(self) -> dict[str, str | list[float] | None]:
        return {"name": self.name, "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None}


def normalization_stats(name: str | Normalization, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) float32 tensors of shape (C, 1, 1) for a preset name or a :class:`Normalization`, or None
    when it does not shift ("none")."""
    norm = name if isinstance(name, Normalization) else Normalization.preset(name)
    if norm.mean is None or norm.std is None:
        return None
    mean, std = norm.mean, norm.std
    if len(mean) != channels:
        raise ConfigError(
            f"normalization {norm.name!r} has {len(mean)} values (one per channel) but the images have {channels} "
            "channels"
        )
    return (
        torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
    )


def to_float(images: torch.Tensor, normalization: str | Normalization = "cifar") -> torch.Tensor:
    """uint8 (N, C, H, W) or (C, H, W) -> float32 of the same shape: x / 255, then (x - mean) / std."""
    channels = images.shape[-3]
    stats = normalization_stats(normalization, channels)
    x = images.to(torch.float32).div_(255.0)
    if stats is not None:
        mean, std = stats
        x.sub_(mean.to(x.device)).div_(std.to(x.device))
    return x


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, *, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """CIFAR training augmentation for a whole batch at once: zero-pad by ``padding`` pixels, take a random
    H x W crop per image, and mirror each image left-right with probability 1/2.

    Args:
        images: (N, C, H, W), any dtype (uint8 in the loaders).
        generator: CPU generator that draws the per-image offsets and flips (makes the result reproducible).
    Returns:
        tensor of the same shape and dtype.
    """
    n, c, h, w = images.shape
    if n == 0:
        return images.clone()
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h)  # (N, H)
    cols_fwd = torch.arange(w)
    cols = offsets[:, 1:] + torch.where(flips[:, None], (w - 1) - cols_fwd, cols_fwd)  # (N, W)
    # One gather over the flattened padded planes does crop and flip together: index (N, C, H*W).
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(padded.reshape(n, c, hp * wp), 2, flat_index.to(images.device))
    return out.reshape(n, c, h, w)


def hflip(image: torch.Tensor) -> torch.Tensor:
    """Mirror (..., H, W) left-right."""
    return image.flip(-1)


def resize(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of (C, H, W) or (N, C, H, W) to float32.

    ``size`` int: the shorter side becomes ``size`` (aspect kept); (h, w): exact output size.
    """
    x = image.to(torch.float32)
    h, w = x.shape[-2:]
    if isinstance(size, int):
        if h <= w:
            out_hw = (size, max(1, round(w * size / h)))
        else:
            out_hw = (max(1, round(h * size / w)), size)
    else:
        out_hw = (int(size[0]), int(size[1]))
    if out_hw == (h, w):
        return x
    batched = x if x.ndim == 4 else x[None]
    out = F.interpolate(batched, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return out if x.ndim == 4 else out[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Central ``size`` x ``size`` window of (..., H, W); zero-padded first if the image is smaller."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = F.pad(image, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size]


def random_resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop: area fraction in ``scale``, aspect ratio (log-uniform) in
    ``ratio``; ten tries, then a central crop with the ratio clamped to ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random crop of (C, H, W) resized to float32 (C, size, size); see :func:`random_resized_crop_box`."""
    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator, scale, ratio)
    return resize(image[..., top : top + h, left : left + w], (size, size))


class ImageNetTransform:
    """Per-item transform for streamed folders: uint8 (C, H, W) -> normalised float32 (C, size, size).

    train: random-resized-crop to ``size`` + random horizontal flip, seeded by (seed, epoch, index) so the
    result does not depend on which DataLoader worker decodes the item. eval: resize the shorter side to
    ``resize_size`` then center-crop ``size``.
    """

    def __init__(
        self,
        *,
        train: bool,
        size: int = 224,
        resize_size: int = 256,
        normalization: str = "imagenet",
        seed: int = 0,
    ):
        if size <= 0 or resize_size <= 0:
            raise ConfigError(f"image sizes must be positive, got size={size} resize_size={resize_size}")
        if normalization not in NORMALIZATION:
            raise ConfigError(
                f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATION)}"
            )
        self.train, self.size, self.resize_size = train, size, resize_size
        self.normalization, self.seed = normalization, seed

    def __call__(self, image: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        if self.train:
            gen = seeded_generator(self.seed, epoch, index)
            x = random_resized_crop(image, self.size, gen)
            if bool(torch.rand(1, generator=gen) < 0.5):
                x = hflip(x)
        else:
            x = center_crop(resize(image, self.resize_size), self.size)
        # resize already maps to float in [0, 255]; normalise the same way as uint8 input.
        stats = normalization_stats(self.normalization, x.shape[0])
        x = x.clamp(0.0, 255.0).div(255.0)
        if stats is not None:
            x = (x - stats[0]) / stats[1]
        return x.contiguous()
