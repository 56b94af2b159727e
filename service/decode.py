"""Where a request's bytes become an image tensor: limits first, then a safe decoder.

Limits are enforced before any pixel is decoded: body size, then the pixel count and aspect
ratio declared in the header (decompression bombs get a 413 without allocating). JPEGs in
RGB or grey decode with torchvision's libjpeg-turbo path (identical pixels to PIL's, faster);
everything else decodes with PIL, which raises on corrupt data where torchvision's PNG
decoder can crash the process on a bad zlib checksum.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from models.transforms import pil_to_rgb_tensor
from service.errors import PayloadTooLarge, RequestError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_ASPECT = 32
EXIF_ORIENTATION = 0x0112
_SOURCE_LOCATION = re.compile(r"\S*\.(?:cpp|h|c):\d+:?")  # torchvision's C++ file:line in its errors


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def decode_image(data: bytes, limits: DecodeLimits) -> torch.Tensor:
    """Encoded image bytes -> uint8 RGB ``(3, H, W)``.

    Raises RequestError (400: empty, not an image, corrupt, extreme aspect ratio) or
    PayloadTooLarge (413: over ``max_bytes`` or ``max_pixels``).
    """
    return decode_checked(data, check_image(data, limits))


def decode_checked(data: bytes, image: Image.Image) -> torch.Tensor:
    """Decode ``data``, whose header ``check_image`` accepted as ``image``."""
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        return _decode_jpeg(data)
    return _decode_pil(image)


def device_decodable(image: Image.Image) -> bool:
    """A JPEG that nvJPEG decodes to the same pixels as the CPU path: RGB or grey, no EXIF rotation
    (torchvision applies EXIF orientation on the CPU only)."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except (OSError, ValueError, SyntaxError, struct.error):  # malformed EXIF: let the CPU path judge it
        return False


def check_image(data: bytes, limits: DecodeLimits) -> Image.Image:
    """The limits and the header, before any pixel is decoded; returns the lazily opened image."""
    if not data:
        raise RequestError("empty image: the request carried no bytes", reason="empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}", reason="too_large")
    image = _open(data)
    width, height = image.size
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image declares {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}",
            reason="too_many_pixels",
        )
    if width < 1 or height < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise RequestError(
            f"image is {width}x{height}: an aspect ratio over {MAX_ASPECT}:1 is not a photo; crop it first",
            reason="aspect_ratio",
        )
    return image


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we enforce our own limit
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)  # orientation unknown: as stored
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        if isinstance(exc, Image.DecompressionBombError):
            raise PayloadTooLarge(f"decompression bomb: {exc}", reason="too_many_pixels") from None
        raise RequestError(
            f"not a recognised image: expected one of {', '.join(FORMATS)} ({len(data)} bytes starting {data[:8]!r})",
            reason="not_an_image",
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise RequestError(f"unreadable image header: {exc}", reason="corrupt") from None


def _decode_jpeg(data: bytes) -> torch.Tensor:
    with jpeg_errors():
        return decode_jpeg(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True
        )


def decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | RequestError]:
    """JPEGs already accepted by ``check_image`` and ``device_decodable`` -> uint8 RGB ``(3, H, W)``
    on ``device`` (nvJPEG, batched, on CUDA). A batch that fails is decoded one by one, so a corrupt
    image gets its own RequestError and the others their pixels."""
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with contextlib.suppress(RequestError):
        with jpeg_errors():
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    out: list[torch.Tensor | RequestError] = []
    for tensor in tensors:
        try:
            with jpeg_errors():
                out.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
        except RequestError as exc:
            out.append(exc)
    return out


@contextlib.contextmanager
def jpeg_errors() -> Iterator[None]:
    """torchvision's JPEG errors and libjpeg's corrupt-data warnings -> RequestError (400)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # libjpeg's "corrupt data" warnings mean a broken file
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
            yield
    except (RuntimeError, UserWarning) as exc:
        # torchvision says "decode_jpeg, <file.cpp:line>, <what>": keep only what went wrong
        parts = [p.strip() for p in _SOURCE_LOCATION.sub("", str(exc).splitlines()[0]).split(",") if p.strip()]
        detail = (parts[-1] if parts else "undecodable")[:200]
        raise RequestError(f"corrupt JPEG: {detail}", reason="corrupt") from None


def _decode_pil(image: Image.Image) -> torch.Tensor:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            image.load()  # first frame of an animation
            return pil_to_rgb_tensor(image)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise RequestError(f"corrupt {image.format} image: {str(exc)[:200]}", reason="corrupt") from None
