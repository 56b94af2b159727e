"""The preprocessing the service applies, on PIL images and uint8 tensors alike."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torchvision.io import decode_image
from torchvision.transforms import v2

from models import CheckpointMeta, eval_transform
from models.transforms import normalize
from tests.conftest import CLASSES7


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (320, 240)) -> bytes:
    image = Image.new(mode, size, color=(200, 30, 60) if mode == "RGB" else 120)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_eval_transform_on_tensor_and_pil_gives_the_crop_size() -> None:
    meta = CheckpointMeta.for_arch("inception_v3", CLASSES7)
    transform = eval_transform(meta)
    data = _jpeg()
    from_tensor = transform(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    from_pil = transform(Image.open(io.BytesIO(data)))
    assert from_tensor.shape == from_pil.shape == (3, 299, 299)
    assert from_tensor.dtype == torch.float32
    # a flat red image normalises to the same per-channel values either way
    assert torch.allclose(from_tensor.mean(dim=(1, 2)), from_pil.mean(dim=(1, 2)), atol=0.02)


def test_eval_transform_normalises_with_the_metadata() -> None:
    meta = CheckpointMeta.for_arch("resnet18", CLASSES7, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    white = torch.full((3, 300, 300), 255, dtype=torch.uint8)
    out = eval_transform(meta)(white)
    assert out.shape == (3, 224, 224)
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_eval_transform_converts_any_pil_mode_to_rgb(mode: str) -> None:
    image = Image.new(mode, (50, 40))
    assert eval_transform(CheckpointMeta.for_arch("resnet18", CLASSES7))(image).shape == (3, 224, 224)


def test_grayscale_tensor_is_expanded_and_bad_tensor_refused() -> None:
    transform = eval_transform(CheckpointMeta.for_arch("resnet18", CLASSES7))
    assert transform(torch.zeros(1, 30, 30, dtype=torch.uint8)).shape == (3, 224, 224)
    with pytest.raises(ValueError, match=r"expected a uint8 \(1\|3, H, W\) tensor, found torch.float32"):
        transform(torch.zeros(3, 30, 30))


@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 3, 16, 9), (2, 2, 3, 4, 4)])
def test_normalize_equals_torchvisions_to_dtype_and_normalize_to_the_bit(shape: tuple[int, ...]) -> None:
    meta = CheckpointMeta.for_arch("resnet18", CLASSES7)
    torchvision_way = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(meta.mean), std=list(meta.std))])
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = normalize(meta)(images)
    assert got.dtype == torch.float32 and got.shape == images.shape
    assert torch.equal(got, torchvision_way(images))


def test_normalize_refuses_what_is_not_uint8_images() -> None:
    norm = normalize(CheckpointMeta.for_arch("resnet18", CLASSES7))
    with pytest.raises(TypeError, match="uint8"):
        norm(torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        norm(torch.zeros(4, 4, dtype=torch.uint8))
