"""Preprocessing: the exact transform the service applies, and training augmentation."""

from __future__ import annotations

import struct

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

from models.checkpoint import CheckpointMeta


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"interpolation must be bilinear, bicubic or nearest, found {name!r}") from None


def eval_transform(meta: CheckpointMeta) -> v2.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1] floats and normalise.

    Accepts a PIL image (EXIF orientation applied, converted to RGB) or a uint8 ``(3, H, W)``
    tensor; returns a float32 ``(3, input_size, input_size)`` tensor. PIL images become uint8
    tensors first, so both inputs go through the same tensor operations, and the service
    (``resize_crop`` per image, then ``normalize`` per batch) computes exactly the same.
    """
    return v2.Compose([v2.Lambda(_to_rgb_image), resize_crop(meta), normalize(meta)])


def resize_crop(meta: CheckpointMeta) -> v2.Compose:
    """uint8 ``(3, H, W)`` -> uint8 ``(3, input_size, input_size)``: the per-image half."""
    return v2.Compose([
        v2.Resize(meta.resize_size, interpolation=_interpolation(meta.interpolation), antialias=True),
        v2.CenterCrop(meta.input_size),
    ])


def normalize(meta: CheckpointMeta) -> Normalize:
    """uint8 images (any leading batch dims) -> normalised float32: the per-batch half."""
    return Normalize(meta.mean, meta.std)


class Normalize:
    """uint8 ``(..., 3, H, W)`` -> float32 scaled to [0, 1], less ``mean``, over ``std``: the very
    operations of ``v2.ToDtype(torch.float32, scale=True)`` then ``v2.Normalize(mean, std)`` (the
    results are equal to the bit), without their per-call dispatch, which on a CPU cost more than
    the arithmetic for one image."""

    def __init__(self, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]) -> None:
        if not all(std):
            raise ValueError(f"std must not contain zeros, found {list(std)}")
        self.mean, self.std = list(mean), list(std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.ndim < 3:
            raise TypeError(f"expected uint8 images (..., C, H, W), found {image.dtype} {tuple(image.shape)}")
        constants = self._constants.get(image.device)
        if constants is None:
            constants = self._constants[image.device] = (
                torch.tensor(self.mean, dtype=torch.float32, device=image.device).view(-1, 1, 1),
                torch.tensor(self.std, dtype=torch.float32, device=image.device).view(-1, 1, 1))
        mean, std = constants
        return image.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


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
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 tensor, found {type(image).__name__}")
    return pil_to_rgb_tensor(image)


def pil_to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode -> uint8 RGB ``(3, H, W)``, EXIF orientation applied.

    16-bit and 32-bit integer images are scaled to 8 bits (PIL's own conversion would clip
    them to white); palette, grey and CMYK images convert through PIL; alpha is dropped.
    An unreadable EXIF block leaves the image as stored.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except (ValueError, TypeError, OSError, SyntaxError, struct.error, KeyError):
        pass  # malformed EXIF: orientation unknown, use the pixels as stored
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(image, dtype=np.int64)
        scale = 65535 if image.mode != "I" or wide.max(initial=0) > 255 else 255
        gray = torch.from_numpy((np.clip(wide, 0, scale) * 255 // scale).astype(np.uint8))
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return v2.functional.pil_to_tensor(image)
