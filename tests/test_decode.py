"""Request bytes -> image tensor: a hostile-image corpus, built here with Pillow and numpy."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.transforms import pil_to_rgb_tensor
from service.errors import PayloadTooLarge, RequestError
from service.http.errors import status_of
from service.inference.decode import MAX_ASPECT, DecodeLimits, decode_image
from tests.images import encode, photo

LIMITS = DecodeLimits()
FORMATS_MSG = "expected one of JPEG, PNG, WEBP, GIF, BMP, TIFF"
IMAGE = photo(1, (120, 90))  # 120 wide, 90 high


def _refused(data: bytes, limits: DecodeLimits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_image(data, limits)
    return info.value


def _ok(data: bytes, limits: DecodeLimits = LIMITS) -> torch.Tensor:
    out = decode_image(data, limits)
    assert out.dtype == torch.uint8
    assert out.ndim == 3 and out.shape[0] == 3
    return out


def _pil(data: bytes) -> torch.Tensor:
    return pil_to_rgb_tensor(Image.open(io.BytesIO(data)))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header that declares ``width`` x ``height`` RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _chunk(b"IEND", b""))


def _png_chunks(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, type, body) of every chunk."""
    found, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        found.append((pos, data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return found


def _corrupt_idat(data: bytes, index: int) -> bytes:
    """Flip the byte at ``index`` of the (only) IDAT body and fix the chunk CRC: only the zlib stream is bad."""
    (pos, kind, body), = [c for c in _png_chunks(data) if c[1] == b"IDAT"]
    bad = bytearray(body)
    bad[index] ^= 0xFF
    return data[:pos + 8] + bytes(bad) + struct.pack(">I", zlib.crc32(kind + bytes(bad))) + data[pos + 12 + len(body):]


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """Insert an APP1 segment after the JFIF APP0 segment."""
    assert jpeg[2:4] == b"\xff\xe0"
    end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:end] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[end:]


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# --- refused before decoding -------------------------------------------------------------------

def test_zero_bytes_is_empty() -> None:
    err = _refused(b"")
    assert (type(err), status_of(err), err.reason) == (RequestError, 400, "empty")
    assert str(err) == "empty image: the request carried no bytes"


def test_over_max_bytes_is_413() -> None:
    data = encode(IMAGE, "PNG")
    err = _refused(data, DecodeLimits(max_bytes=len(data) - 1))
    assert (type(err), status_of(err), err.reason) == (PayloadTooLarge, 413, "too_large")
    assert str(err) == f"image is {len(data)} bytes, over the limit of {len(data) - 1}"
    assert _ok(data, DecodeLimits(max_bytes=len(data))).shape == (3, 90, 120)  # the limit itself is fine


def test_over_max_bytes_is_checked_before_anything_else() -> None:
    err = _refused(b"not an image at all", DecodeLimits(max_bytes=5))
    assert (status_of(err), err.reason) == (413, "too_large")


@pytest.mark.parametrize("data", [
    b"hello, I am definitely a JPEG image",
    b"GIF89a? no",
    b"\x00" * 64,
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
    b"RIFF\x10\x00\x00\x00WAVEfmt ",
], ids=["text", "fake-gif-magic", "zeros", "pdf", "wav"])
def test_wrong_magic_is_not_an_image(data: bytes) -> None:
    err = _refused(data)
    assert (type(err), status_of(err), err.reason) == (RequestError, 400, "not_an_image")
    assert str(err) == f"not a recognised image: {FORMATS_MSG} ({len(data)} bytes starting {data[:8]!r})"


def test_svg_is_not_an_image() -> None:
    data = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10"/></svg>')
    err = _refused(data)
    assert (status_of(err), err.reason) == (400, "not_an_image")
    assert str(err) == f"not a recognised image: {FORMATS_MSG} ({len(data)} bytes starting b'<?xml ve')"


def test_megabytes_of_noise_are_not_an_image() -> None:
    data = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    err = _refused(data)
    assert (status_of(err), err.reason) == (400, "not_an_image")
    assert str(err).startswith(f"not a recognised image: {FORMATS_MSG} (3000000 bytes starting ")


def test_decompression_bomb_is_413_from_the_header() -> None:
    # 30000 x 30000 = 9e8 pixels: Pillow's own bomb check fires while reading the header
    data = _png_declaring(30000, 30000)
    err = _refused(data)
    assert (type(err), status_of(err), err.reason) == (PayloadTooLarge, 413, "too_many_pixels")
    assert str(err) == ("decompression bomb: Image size (900000000 pixels) exceeds limit of "
                        f"{2 * Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack.")


def test_pixel_limit_is_checked_on_the_declared_size() -> None:
    # 10000 x 10000 is under Pillow's limit but over ours; the IDAT holds 16 bytes, so nothing was decoded
    err = _refused(_png_declaring(10000, 10000))
    assert (type(err), status_of(err), err.reason) == (PayloadTooLarge, 413, "too_many_pixels")
    assert str(err) == "image declares 10000x10000 = 100000000 pixels, over the limit of 40000000"


def test_pixel_limit_is_inclusive() -> None:
    data = encode(photo(2, (20, 20)), "PNG")
    err = _refused(data, DecodeLimits(max_pixels=399))
    assert str(err) == "image declares 20x20 = 400 pixels, over the limit of 399"
    assert status_of(err) == 413
    assert _ok(data, DecodeLimits(max_pixels=400)).shape == (3, 20, 20)


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (33, 1), (1, 33), (330, 10)])
def test_extreme_aspect_ratio_is_refused(size: tuple[int, int]) -> None:
    err = _refused(encode(Image.new("RGB", size), "PNG"))
    assert (type(err), status_of(err), err.reason) == (RequestError, 400, "aspect_ratio")
    assert str(err) == (f"image is {size[0]}x{size[1]}: an aspect ratio over {MAX_ASPECT}:1 is not a photo; "
                        "crop it first")


@pytest.mark.parametrize("size", [(32, 1), (1, 32), (320, 10)])
def test_aspect_ratio_of_exactly_32_is_fine(size: tuple[int, int]) -> None:
    assert _ok(encode(Image.new("RGB", size, (9, 8, 7)), "PNG")).shape == (3, size[1], size[0])


# --- corrupt data ------------------------------------------------------------------------------

def test_truncated_jpeg_is_corrupt() -> None:
    data = encode(IMAGE, "JPEG", quality=90)
    err = _refused(data[: len(data) // 2])
    assert (type(err), status_of(err), err.reason) == (RequestError, 400, "corrupt")
    assert str(err).startswith("corrupt JPEG: ")


def test_jpeg_truncated_inside_its_header_is_corrupt() -> None:
    err = _refused(encode(IMAGE, "JPEG", quality=90)[:200])
    assert (status_of(err), err.reason) == (400, "corrupt")
    assert str(err) == "unreadable image header: Truncated File Read"


def test_truncated_progressive_jpeg_is_corrupt() -> None:
    data = encode(IMAGE, "JPEG", quality=90, progressive=True)
    err = _refused(data[: len(data) * 2 // 3])
    assert (status_of(err), err.reason) == (400, "corrupt")


def test_truncated_png_is_corrupt() -> None:
    data = encode(IMAGE, "PNG")
    err = _refused(data[: len(data) // 2])
    assert (type(err), status_of(err), err.reason) == (RequestError, 400, "corrupt")
    assert str(err) == "corrupt PNG image: image file is truncated"


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_other_formats_are_refused(fmt: str) -> None:
    data = encode(IMAGE, fmt)
    err = _refused(data[: len(data) // 2])
    assert status_of(err) == 400
    assert err.reason in ("corrupt", "not_an_image")


def test_bad_zlib_checksum_in_png_is_refused_without_crashing(tmp_path: Path) -> None:
    """torchvision's PNG decoder segfaults on a bad adler32; decode_image must answer 400 and live on."""
    rng = np.random.default_rng(0)
    good = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    (_, _, idat), = [c for c in _png_chunks(good) if c[1] == b"IDAT"]
    bad_adler = _corrupt_idat(good, len(idat) - 1)  # last byte of the zlib stream: its adler32
    bad_deflate = _corrupt_idat(good, len(idat) // 2)  # inside the deflate data
    # only the zlib stream is bad: every chunk CRC still checks out
    for data in (bad_adler, bad_deflate):
        for _, kind, body in _png_chunks(data):
            pos = data.index(kind + body)
            assert struct.unpack(">I", data[pos + 4 + len(body):pos + 8 + len(body)])[0] == zlib.crc32(kind + body)
    with pytest.raises(zlib.error, match="incorrect data check"):
        zlib.decompress([c for c in _png_chunks(bad_adler) if c[1] == b"IDAT"][0][2])
    paths = []
    for name, data in (("adler.png", bad_adler), ("deflate.png", bad_deflate)):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from service.inference.decode import DecodeLimits, decode_image\n"
        "from service.errors import RequestError\n"
        "from service.http.errors import status_of\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        decode_image(Path(path).read_bytes(), DecodeLimits())\n"
        "        print('decoded')\n"
        "    except RequestError as exc:\n"
        "        print(type(exc).__name__, status_of(exc), exc.reason, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, f"decoder died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.splitlines() == [
        "RequestError 400 corrupt corrupt PNG image: broken data stream when reading image file",
        "RequestError 400 corrupt corrupt PNG image: broken data stream when reading image file",
    ]


# --- decoded ----------------------------------------------------------------------------------

def test_one_pixel_image() -> None:
    for fmt in ("PNG", "JPEG", "BMP"):
        out = _ok(encode(Image.new("RGB", (1, 1), (10, 200, 30)), fmt))
        assert out.shape == (3, 1, 1)
    assert _ok(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")).flatten().tolist() == [10, 200, 30]


def test_rgb_png_is_exact() -> None:
    array = np.asarray(IMAGE)
    out = _ok(encode(IMAGE, "PNG"))
    assert torch.equal(out, torch.from_numpy(array.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("options", [{"quality": 90}, {"quality": 90, "progressive": True}, {"quality": 20},
                                     {"quality": 95, "subsampling": 0}], ids=["baseline", "progressive", "q20", "444"])
def test_jpeg_equals_pil(options: dict[str, object]) -> None:
    data = encode(IMAGE, "JPEG", **options)
    out = _ok(data)
    assert out.shape == (3, 90, 120)
    assert torch.equal(out, _pil(data))


def test_grayscale_jpeg_equals_pil() -> None:
    data = encode(IMAGE.convert("L"), "JPEG", quality=90)
    out = _ok(data)
    assert torch.equal(out, _pil(data))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_cmyk_jpeg_equals_pil_convert_rgb() -> None:
    data = encode(IMAGE.convert("CMYK"), "JPEG", quality=90)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    out = _ok(data)
    assert torch.equal(out, expected)
    assert torch.equal(out, _pil(data))


def test_16_bit_png_scales_to_8_bits() -> None:
    wide = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 257 * x for every 8-bit x
    data = encode(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = _ok(data)
    assert out.shape == (3, 16, 16)
    expected = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    for channel in out:
        assert torch.equal(channel, expected)
    assert out[:, 15, 15].tolist() == [255, 255, 255]  # 65535 -> 255
    assert torch.equal(out, _pil(data))


def test_16_bit_png_rounds_down() -> None:
    wide = np.array([[0, 1, 256, 257, 65534, 65535]], dtype=np.uint16).repeat(2, axis=0)
    out = _ok(encode(Image.fromarray(wide), "PNG"))
    assert out[0, 0].tolist() == [0, 0, 0, 1, 254, 255]


def test_grayscale_png() -> None:
    gray = IMAGE.convert("L")
    out = _ok(encode(gray, "PNG"))
    expected = torch.from_numpy(np.array(gray))
    assert all(torch.equal(channel, expected) for channel in out)


def test_rgba_png_drops_alpha() -> None:
    rgba = np.dstack([np.asarray(IMAGE), np.full((90, 120), 7, dtype=np.uint8)])
    data = encode(Image.fromarray(rgba, "RGBA"), "PNG")
    out = _ok(data)
    assert torch.equal(out, torch.from_numpy(np.array(IMAGE)).permute(2, 0, 1))
    assert torch.equal(out, _pil(data))


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_png(transparency: int | None) -> None:
    palette = IMAGE.convert("P")
    options = {} if transparency is None else {"transparency": transparency}
    data = encode(palette, "PNG", **options)
    out = _ok(data)
    assert torch.equal(out, torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1))
    assert torch.equal(out, _pil(data))


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [photo(seed, (40, 30)).convert("P") for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    data = buf.getvalue()
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = _ok(data)
    assert out.shape == (3, 30, 40)
    assert torch.equal(out, torch.from_numpy(np.array(frames[0].convert("RGB"))).permute(2, 0, 1))
    assert torch.equal(out, _pil(data))
    second = Image.open(io.BytesIO(data))
    second.seek(1)
    assert not torch.equal(out, pil_to_rgb_tensor(second))


@pytest.mark.parametrize(("fmt", "options", "lossless"), [
    ("BMP", {}, True), ("TIFF", {}, True), ("TIFF", {"compression": "tiff_lzw"}, True),
    ("WEBP", {"lossless": True}, True), ("WEBP", {"quality": 80}, False),
])
def test_other_formats(fmt: str, options: dict[str, object], lossless: bool) -> None:
    data = encode(IMAGE, fmt, **options)
    out = _ok(data)
    assert out.shape == (3, 90, 120)
    assert torch.equal(out, _pil(data))
    if lossless:
        assert torch.equal(out, torch.from_numpy(np.array(IMAGE)).permute(2, 0, 1))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_rotates(fmt: str) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    plain = _ok(encode(IMAGE, fmt, **options))
    data = encode(IMAGE, fmt, exif=_exif(6), **options)
    out = _ok(data)
    assert out.shape == (3, 120, 90)  # H and W swapped
    assert torch.equal(out, torch.rot90(plain, k=-1, dims=(1, 2)))  # 6: rotate 90 degrees clockwise
    assert torch.equal(out, _pil(data))


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 7, 8, 0, 9])
def test_every_exif_orientation_matches_pil(orientation: int) -> None:
    data = encode(IMAGE, "JPEG", quality=90, exif=_exif(orientation))
    out = _ok(data)
    assert out.shape == ((3, 120, 90) if orientation in (5, 6, 7, 8) else (3, 90, 120))
    assert torch.equal(out, _pil(data))


MALFORMED_EXIF = [
    b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff" + b"\x01" * 40,  # 65535 entries, 40 bytes of them
    b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # first IFD far past the end
    b"Exif\x00\x00" + b"garbage!!" * 5,  # no TIFF header at all
]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow warns, and the image is served as stored
@pytest.mark.parametrize("payload", MALFORMED_EXIF, ids=["short-ifd", "ifd-offset", "no-tiff-header"])
def test_malformed_exif_is_served_as_stored(payload: bytes) -> None:
    clean = encode(IMAGE, "JPEG", quality=90)
    out = _ok(_with_app1(clean, payload))
    assert torch.equal(out, _pil(clean))


def test_malformed_exif_decodes_whatever_the_warning_filters() -> None:
    clean = encode(IMAGE, "JPEG", quality=90)
    out = decode_image(_with_app1(clean, MALFORMED_EXIF[0]), LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(out, _pil(clean))
