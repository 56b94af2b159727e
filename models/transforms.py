"""Preprocessing: the exact transform the service applies, and training augmentation."""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from models.checkpoint import CheckpointMeta


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"interpolation must be bilinear, bicubic or nearest, found {name!r}") from None


def eval_transform(meta: CheckpointMeta) -> v2.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1] floats and normalise.

    Accepts a PIL image (converted to RGB) or a uint8 ``(3, H, W)`` tensor; returns a float32
    ``(3, input_size, input_size)`` tensor. The service applies the same steps to decoded
    uint8 tensors, so ``eval_transform(meta)(decode_image(bytes))`` reproduces its inputs.
    """
    return v2.Compose([
        v2.Lambda(_to_rgb_image),
        v2.Resize(meta.resize_size, interpolation=_interpolation(meta.interpolation), antialias=True),
        v2.CenterCrop(meta.input_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(meta.mean), std=list(meta.std)),
    ])


def train_transform(meta: CheckpointMeta) -> v2.Compose:
    """Standard augmentation: random resized crop, horizontal flip, mild colour jitter."""
    return v2.Compose([
        v2.Lambda(_to_rgb_image),
        v2.RandomResizedCrop(meta.input_size, scale=(0.6, 1.0), interpolation=_interpolation(meta.interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(meta.mean), std=list(meta.std)),
    ])


def _to_rgb_image(image: object) -> torch.Tensor:
    """PIL image (any mode) or uint8 tensor -> uint8 (3, H, W) tensor."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 (1|3, H, W) tensor, found {image.dtype} {tuple(image.shape)}")
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    convert = getattr(image, "convert", None)
    if convert is None:
        raise TypeError(f"expected a PIL image or a uint8 tensor, found {type(image).__name__}")
    return v2.functional.pil_to_tensor(convert("RGB"))
