"""Small deterministic test images in several formats and modes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth random 'photo': low-frequency colour noise, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(size[1] // 25 + 1, size[0] // 25 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (500, 375)) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=90)


def bogus_huffman_table(data: bytes) -> bytes:
    """Every header a parser reads intact, but a Huffman table with impossible code counts: a file
    only a decoder finds corrupt."""
    out = bytearray(data)
    at = out.index(b"\xff\xc4")  # DHT: marker, length (2), class/id (1), 16 code counts
    out[at + 5:at + 21] = b"\xff" * 16
    return bytes(out)
