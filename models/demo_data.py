"""Built-in image tasks: deterministic ImageFolder trees of drawn shapes and stroke glyphs.

Two tasks share everything but the foreground: the same textured, noisy backgrounds, colours,
sizes, positions and rotations. ``shapes`` are filled or outlined geometric shapes; ``glyphs``
are pen strokes (corners, junctions, crossings, parallels, zigzags, arcs), different classes
built from the same edges, corners and curves, so that a backbone trained on ``shapes`` gives
a head start on ``glyphs``.

Images are drawn with Pillow's ImageDraw: Pillow is a dependency of torchvision, so this adds
nothing to install. Every image has its own ``random.Random`` seeded from (seed, task, split,
class, index), never the global RNG, and JPEGs are written with fixed settings and no
metadata, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

from PIL import Image, ImageChops, ImageDraw, ImageFilter

TASKS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "shapes": ("circle", "crescent", "cross", "square", "star", "triangle"),
    "glyphs": ("angle", "arc", "bars", "crossing", "tee", "zigzag"),
})
MARKER = "demo-data.json"
JPEG_QUALITY = 92
_SUPERSAMPLE = 2  # ImageDraw does not anti-alias: draw at twice the size, then downsample.

Point = tuple[float, float]


@dataclass(frozen=True)
class DemoData:
    """What ``write_demo_data`` wrote: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``."""

    root: str
    task: str
    classes: tuple[str, ...]
    train_per_class: int
    val_per_class: int
    size: int
    seed: int


def val_per_class(per_class: int) -> int:
    """Validation images per class for ``per_class`` training images: a quarter, at least 10."""
    return max(10, per_class // 4)


def write_demo_data(
    out: str | Path, *, task: str = "shapes", per_class: int = 200, size: int = 64, seed: int = 0
) -> DemoData:
    """Write the ``task`` ImageFolder tree under ``out``; returns what was written.

    A tree written earlier by this function (it leaves ``out/demo-data.json``) is replaced.
    Raises ValueError for an unknown task, a count or size out of range, or an ``out`` whose
    ``train``/``val`` folders hold files this function did not write.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, found {task!r}")
    if per_class < 1 or not 16 <= size <= 1024:
        raise ValueError(f"expected per_class >= 1 and 16 <= size <= 1024, found {per_class} and {size}")
    root = Path(out)
    _clear_previous(root)
    summary = DemoData(str(root), task, TASKS[task], per_class, val_per_class(per_class), size, seed)
    root.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in asdict(summary).items() if k != "root"}  # same arguments, same bytes: no paths
    # Written first: it marks the tree as ours, so an interrupted run's half-tree is replaced next time.
    (root / MARKER).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    for split, count in (("train", summary.train_per_class), ("val", summary.val_per_class)):
        for name in summary.classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                rng = random.Random(f"headswap-demo/{seed}/{task}/{split}/{name}/{index}")
                image = draw_image(task, name, size=size, rng=rng)
                image.save(folder / f"{name}_{index:05d}.jpg", format="JPEG", quality=JPEG_QUALITY,
                           subsampling=0, optimize=False, progressive=False)
    return summary


def _clear_previous(root: Path) -> None:
    splits = [root / split for split in ("train", "val") if (root / split).exists()]
    if splits and not (root / MARKER).is_file():
        raise ValueError(f"{root}: holds {splits[0].name}/ but was not written by demo-data; choose an empty folder")
    (root / MARKER).unlink(missing_ok=True)
    for split in splits:
        shutil.rmtree(split)


def draw_image(task: str, class_name: str, *, size: int, rng: random.Random) -> Image.Image:
    """Draw one ``size`` x ``size`` RGB image of ``class_name``, all randomness from ``rng``.

    Raises ValueError for an unknown task or class.
    """
    if class_name not in TASKS.get(task, ()):
        known = ", ".join(TASKS.get(task, ()))
        raise ValueError(f"class must be one of {known} of task {task!r}, found {class_name!r}")
    px = size * _SUPERSAMPLE
    image, colours = _background(rng, px)
    mask = _shape_mask(class_name, rng, px) if task == "shapes" else _glyph_mask(class_name, rng, px)
    image.paste(_contrasting(rng, colours), (0, 0, px, px), mask)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    noise = Image.frombytes("L", (size, size), rng.randbytes(size * size)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.05, 0.2))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting(rng: random.Random, background: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    # Learnable, not trivial: the shape differs from every background colour by 60+ in luma
    # (drawn again until it does; bounded so a pathological background cannot loop forever).
    colour = _colour(rng)
    for _ in range(100):
        if all(abs(_luma(colour) - _luma(c)) >= 60 for c in background):
            break
        colour = _colour(rng)
    return colour


def _background(rng: random.Random, px: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """Two colours blended through a gradient or blotches, plus low-contrast stripes or dots."""
    c1, c2 = _colour(rng), _colour(rng)
    if rng.random() < 0.5:
        blend = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
        blend = blend.crop((48, 48, 208, 208)).resize((px, px), Image.Resampling.BILINEAR)
    else:
        cells = rng.randrange(3, 8)
        blend = Image.frombytes("L", (cells, cells), rng.randbytes(cells * cells))
        blend = blend.resize((px, px), Image.Resampling.BICUBIC)
    image = Image.composite(Image.new("RGB", (px, px), c1), Image.new("RGB", (px, px), c2), blend)
    texture = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(texture)
    step = rng.uniform(0.06, 0.16) * px
    if rng.random() < 0.5:  # stripes at any angle: long straight edges that are not the class
        angle, width = rng.uniform(0, math.pi), max(1, round(step * rng.uniform(0.15, 0.4)))
        dx, dy = math.cos(angle), math.sin(angle)
        for k in range(-int(1.5 * px / step), int(1.5 * px / step) + 1):
            ox, oy = px / 2 - dy * k * step, px / 2 + dx * k * step
            draw.line([(ox - dx * px, oy - dy * px), (ox + dx * px, oy + dy * px)], fill=255, width=width)
    else:  # dots
        for _ in range(int((px / step) ** 2 / 2)):
            x, y, r = rng.uniform(0, px), rng.uniform(0, px), step * rng.uniform(0.1, 0.25)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    overlay = Image.new("RGB", (px, px), _colour(rng))
    strength = rng.uniform(0.1, 0.3)
    image.paste(overlay, (0, 0, px, px), texture.point(lambda v: round(v * strength)))
    return image, [c1, c2]


def _place(rng: random.Random, px: int, scale: tuple[float, float]) -> tuple[float, float, float, float]:
    """Centre, radius and rotation: near the middle, so the eval transform's centre crop seldom cuts it."""
    r = px * rng.uniform(*scale)
    return px * rng.uniform(0.38, 0.62), px * rng.uniform(0.38, 0.62), r, rng.uniform(0, 2 * math.pi)


def _transform(points: list[Point], cx: float, cy: float, r: float, theta: float) -> list[Point]:
    cos, sin = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _ngon(n: int, radii: tuple[float, ...] = (1.0,)) -> list[Point]:
    """Vertices of a regular ``n``-gon, or a star when ``radii`` alternates between two radii."""
    k = n * len(radii)
    return [(radii[i % len(radii)] * math.cos(2 * math.pi * i / k),
             radii[i % len(radii)] * math.sin(2 * math.pi * i / k)) for i in range(k)]


def _shape_mask(name: str, rng: random.Random, px: int) -> Image.Image:
    cx, cy, r, theta = _place(rng, px, (0.2, 0.3))
    mask = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(mask)
    if name in ("circle", "crescent"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if name == "crescent":  # a disk with an offset disk cut out of it
            (ox, oy) = _transform([(rng.uniform(0.35, 0.6), 0.0)], cx, cy, r, theta)[0]
            r2 = r * rng.uniform(0.75, 0.95)
            draw.ellipse([ox - r2, oy - r2, ox + r2, oy + r2], fill=0)
    else:
        w = rng.uniform(0.28, 0.4)
        local = {
            "triangle": _ngon(3),
            "square": _ngon(4),
            "star": _ngon(5, (1.0, rng.uniform(0.38, 0.5))),
            "cross": [(w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w),
                      (1, -w), (1, w)],
        }[name]
        draw.polygon(_transform(local, cx, cy, r, theta), fill=255)
    if rng.random() < 0.4:  # outlined: the mask minus its erosion, whatever the shape
        k = 2 * round(px * rng.uniform(0.035, 0.055)) + 1
        mask = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(k)))
    return mask


def _glyph_strokes(name: str, rng: random.Random) -> list[list[Point]]:
    """Polylines in a unit box around the origin."""
    if name == "angle":
        half, arm = math.radians(rng.uniform(50, 110)) / 2, 1.4
        tips = [(arm * math.cos(half) - 0.7, s * arm * math.sin(half)) for s in (1, -1)]
        return [[tips[0], (-0.7, 0.0), tips[1]]]
    if name == "tee":
        return [[(-1.0, -0.8), (1.0, -0.8)], [(0.0, -0.8), (0.0, 1.0)]]
    if name == "crossing":
        phi = math.radians(rng.uniform(60, 120))
        return [[(-1.0, 0.0), (1.0, 0.0)], [(-math.cos(phi), -math.sin(phi)), (math.cos(phi), math.sin(phi))]]
    if name == "bars":
        d = rng.uniform(0.35, 0.6)
        return [[(-1.0, -d), (1.0, -d)], [(-1.0, d), (1.0, d)]]
    if name == "zigzag":
        return [[(-0.9, -0.9), (0.9, -0.9), (-0.9, 0.9), (0.9, 0.9)]]
    start, span = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(180, 270))  # arc
    return [[(math.cos(start + span * i / 24), math.sin(start + span * i / 24)) for i in range(25)]]


def _glyph_mask(name: str, rng: random.Random, px: int) -> Image.Image:
    cx, cy, r, theta = _place(rng, px, (0.24, 0.32))
    width = max(2, round(px * rng.uniform(0.035, 0.06)))
    mask = Image.new("L", (px, px), 0)
    draw = ImageDraw.Draw(mask)
    jitter = 0.02 if name == "arc" else 0.06  # a hand's wobble; an arc's many points would turn it into a scrawl
    for stroke in _glyph_strokes(name, rng):
        wobbly = [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)) for x, y in stroke]
        points = _transform(wobbly, cx, cy, r, theta)
        draw.line(points, fill=255, width=width, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return mask
