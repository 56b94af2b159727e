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
DEVICE_MAX_PIXELS = 4096 * 4096  # larger JPEGs are decoded by the API servers, one at a time
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


def device_decodable(data: bytes, image: Image.Image) -> bool:
    """Whether the worker may decode ``data`` (accepted by ``check_image`` as ``image``) on its device.

    Only plain files go there: a sequential Huffman JPEG (nvJPEG decodes progressive ones on the
    CPU, one at a time) in RGB or grey, with one frame header that declares the size the limits
    were checked against (a second one could declare a bomb), at most DEVICE_MAX_PIXELS, ending
    with its end-of-image marker (nvJPEG may decode a truncated file without an error), and no
    EXIF rotation (torchvision applies it on the CPU only). Anything else is decoded by the API
    server as usual.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or not data.endswith(b"\xff\xd9"):
        return False
    frames = _frame_headers(data)
    if frames is None or len(frames) != 1:
        return False
    marker, height, width = frames[0]
    if marker not in (0xC0, 0xC1) or (width, height) != image.size or width * height > DEVICE_MAX_PIXELS:
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except (OSError, ValueError, SyntaxError, struct.error):  # malformed EXIF: let the CPU path judge it
        return False


def _frame_headers(data: bytes) -> list[tuple[int, int, int]] | None:
    """(marker, height, width) of every start-of-frame segment before the first start-of-scan;
    None when the marker stream is malformed or has no scan."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, frames = 2, []
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return frames
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if length < 7 or pos + 9 > len(data):
                return None
            frames.append((marker, int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")))
        pos += 2 + length
    return None


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
    with contextlib.suppress(RequestError), jpeg_errors():
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    out: list[torch.Tensor | RequestError] = []
    for data, tensor in zip(blobs, tensors):
        try:
            with jpeg_errors():
                out.append(decode_jpeg([tensor], mode=ImageReadMode.RGB, device=device)[0])
        except RequestError as exc:
            if device.type == "cpu":
                out.append(exc)
                continue
            try:  # nvJPEG refuses some valid files (arithmetic coding, rare subsamplings): libjpeg decides
                out.append(_decode_jpeg(data).to(device))
            except RequestError as cpu_exc:
                out.append(cpu_exc)
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
        # Only the first line says what failed: builds that append the C++ stack trace name their
        # frames (vision::image::CUDAJpegDecoder::...) whatever the cause.
        first = (str(exc).splitlines() or [""])[0]
        if isinstance(exc, torch.OutOfMemoryError) or "CUDA" in first:
            raise  # the device failed, not the file: a 5xx for the batch, never the client's fault
        # torchvision says "decode_jpeg, <file.cpp:line>, <what>": keep only what went wrong
        parts = [p.strip() for p in _SOURCE_LOCATION.sub("", first).split(",") if p.strip()]
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
