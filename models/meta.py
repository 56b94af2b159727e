"""What a checkpoint says about itself, and its version: plain data, no torch.

``CheckpointMeta`` is the metadata every checkpoint carries; ``content_version`` is the hash
that names its weights. Both are read here without torch, so that ``headswap inspect`` of a
``.safetensors`` file (``models/summary.py``) starts in milliseconds; ``models/checkpoint.py``
reads and writes whole checkpoints with the same two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.archs import get_spec
from models.errors import CheckpointError

FORMAT_VERSION = 1
SUFFIXES = (".safetensors", ".pt", ".pth")
VERSION_DIGITS = 12
META_KEY = "headswap"  # the safetensors ``__metadata__`` key that holds the JSON metadata


@dataclass
class CheckpointMeta:
    """What a checkpoint says about itself: enough to rebuild, preprocess and label."""

    arch: str
    num_classes: int
    class_names: list[str]
    input_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"
    name: str = ""
    created_at: str = ""
    parent_version: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_arch(
        cls, arch: str, class_names: list[str], **fields: Any
    ) -> CheckpointMeta:
        """Metadata for ``arch`` with its table defaults for preprocessing."""
        spec = get_spec(arch)
        defaults: dict[str, Any] = dict(
            input_size=spec.input_size,
            resize_size=spec.resize_size,
            interpolation=spec.interpolation,
            mean=list(spec.mean),
            std=list(spec.std),
            name=arch,
            created_at=utc_now(),
        )
        defaults.update(fields)
        return cls(arch=arch, num_classes=len(class_names), class_names=list(class_names), **defaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "<meta>") -> CheckpointMeta:
        """Validate and build from a plain dict; raises CheckpointError naming the bad field."""
        if not isinstance(data, dict):
            raise CheckpointError(path, f"metadata must be an object, found {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"arch", "num_classes", "class_names"} - set(data)
        if missing:
            raise CheckpointError(path, f"metadata lacks {', '.join(sorted(missing))}")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise CheckpointError(
                path, f"format_version {data['format_version']} is newer than this headswap reads ({FORMAT_VERSION})"
            )
        filled = {k: v for k, v in data.items() if k in known}
        try:
            spec = get_spec(str(data["arch"]))
        except ValueError as exc:
            raise CheckpointError(path, str(exc)) from None
        filled.setdefault("input_size", spec.input_size)
        filled.setdefault("resize_size", spec.resize_size)
        filled.setdefault("mean", list(spec.mean))
        filled.setdefault("std", list(spec.std))
        meta = cls(**filled)
        for name, ok in _field_checks(meta).items():
            if not ok:
                raise CheckpointError(path, f"malformed metadata: {name} is {getattr(meta, name)!r}"[:300])
        if not isinstance(meta.num_classes, int) or meta.num_classes < 1:
            raise CheckpointError(path, f"num_classes must be a positive int, found {meta.num_classes!r}")
        if len(meta.class_names) != meta.num_classes:
            raise CheckpointError(
                path, f"{len(meta.class_names)} class names for num_classes={meta.num_classes}"
            )
        return meta


def _field_checks(meta: CheckpointMeta) -> dict[str, bool]:
    """Whether each field that preprocessing, labels and rebuilding use has its type: a malformed
    checkpoint is a CheckpointError when read, not a TypeError wherever a field is first used."""
    def size(value: Any) -> bool:
        return type(value) is int and value > 0

    def numbers(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and bool(value) and all(type(x) in (int, float) for x in value)

    return {
        "class_names": isinstance(meta.class_names, (list, tuple)) and all(isinstance(c, str) for c in meta.class_names),
        "input_size": size(meta.input_size), "resize_size": size(meta.resize_size),
        "mean": numbers(meta.mean), "std": numbers(meta.std), "interpolation": isinstance(meta.interpolation, str),
        "partial": isinstance(meta.partial, bool), "arch_kwargs": isinstance(meta.arch_kwargs, dict),
        "training": isinstance(meta.training, dict),
    }


def read_checkpoint_file(path: str | os.PathLike[str], limit: int = -1) -> bytes:
    """The bytes of the checkpoint at ``path`` (the first ``limit`` if given).

    Raises CheckpointError naming it when unreadable.
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        raise cannot_read(str(path), exc) from None


def cannot_read(where: str, exc: OSError) -> CheckpointError:
    """The CheckpointError for a file the system does not hand over (missing, a folder, no permission)."""
    return CheckpointError(where, f"cannot read: {exc.strerror or exc}")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def content_version(tensors: Iterable[tuple[str, str, tuple[int, ...], bytes | memoryview]]) -> str:
    """A checkpoint's version: sha256 over tensor names, dtypes, shapes and bytes, in name order.

    ``tensors`` yields ``(name, dtype, shape, data)`` sorted by name (consumed one at a time, so
    a caller can hand over one tensor's bytes at a time): the dtype as torch names it without
    its ``torch.`` prefix (``float32``), the shape as a tuple of ints, the data as the tensor's
    contiguous little-endian bytes. Returns the first 12 hex digits; raises ValueError when
    the names are not sorted.
    """
    digest = hashlib.sha256()
    previous: str | None = None
    for name, dtype, shape, data in tensors:
        if previous is not None and name <= previous:
            raise ValueError(f"tensors must come sorted by name, found {name!r} after {previous!r}")
        previous = name
        digest.update(f"{name}\0{dtype}\0{shape}\0".encode())
        if len(data):
            digest.update(data)
    return digest.hexdigest()[:VERSION_DIGITS]


def meta_from_safetensors(
    where: str, metadata: dict[str, str], *, arch: str | None = None, num_classes: int | None = None
) -> CheckpointMeta:
    """The metadata of a safetensors file from its ``__metadata__`` strings.

    A file without headswap metadata is a bare state: ``arch`` and ``num_classes`` name it.
    Raises CheckpointError.
    """
    if META_KEY not in metadata:
        return bare_meta(where, arch, num_classes)
    try:
        raw = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(where, f"headswap metadata is not JSON: {exc}") from None
    return meta_from(where, raw)


def meta_from(where: str, raw: Any) -> CheckpointMeta:
    """``CheckpointMeta.from_dict`` with a malformed field reported as CheckpointError."""
    try:
        return CheckpointMeta.from_dict(raw, path=where)
    except TypeError as exc:
        raise CheckpointError(where, f"malformed metadata: {exc}") from None


def bare_meta(where: str, arch: str | None, num_classes: int | None) -> CheckpointMeta:
    """Metadata for a state without any: the caller names its architecture and class count."""
    if arch is None or num_classes is None:
        raise CheckpointError(
            where, "a bare state_dict without headswap metadata: name its architecture and class "
            "count (arch= and num_classes=, or --arch and --num-classes)"
        )
    try:
        return CheckpointMeta.for_arch(arch, [str(i) for i in range(num_classes)], name=Path(where).stem)
    except ValueError as exc:
        raise CheckpointError(where, str(exc)) from None
