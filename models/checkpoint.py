"""Checkpoints: a state_dict plus metadata, written atomically, read without unpickling code.

Two encodings share one meaning:

* ``.safetensors`` (preferred): tensors plus the metadata as JSON under the header's
  ``__metadata__["headswap"]`` key.
* ``.pt``: ``torch.save({"state_dict": ..., "meta": {...}})``, read with ``weights_only=True``.

A bare ``.pt`` state_dict (``torch.save(model.state_dict(), PATH)``) loads when the caller
names the architecture and class count. A checkpoint's *version* is a content hash of its
tensors, so the same weights have the same version in either encoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch

from models import safetensors_format
from models.archs import get_spec
from models.errors import CheckpointError, UnsafeCheckpointError

FORMAT_VERSION = 1
SUFFIXES = (".safetensors", ".pt", ".pth")
VERSION_DIGITS = 12
_META_KEY = "headswap"

State = dict[str, torch.Tensor]


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
        if not isinstance(meta.num_classes, int) or meta.num_classes < 1:
            raise CheckpointError(path, f"num_classes must be a positive int, found {meta.num_classes!r}")
        if len(meta.class_names) != meta.num_classes:
            raise CheckpointError(
                path, f"{len(meta.class_names)} class names for num_classes={meta.num_classes}"
            )
        return meta


class LoadedCheckpoint(NamedTuple):
    state: State
    meta: CheckpointMeta
    version: str


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def state_version(state: State) -> str:
    """Content hash of a state: sha256 over names, dtypes, shapes and bytes, sorted by name.

    Returns the first 12 hex digits. Independent of the file encoding and of the device.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(state[key].shape)}\0".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    return digest.hexdigest()[:VERSION_DIGITS]


def save_checkpoint(path: str | os.PathLike[str], state: State, meta: CheckpointMeta) -> str:
    """Write ``state`` and ``meta`` atomically (temp file in the same folder, then rename).

    The encoding follows the suffix: ``.safetensors``, else ``.pt``/``.pth``. Returns the
    version. Raises ValueError for an unknown suffix.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: checkpoint suffix must be one of {', '.join(SUFFIXES)}, found {path.suffix!r}")
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is shared like any file
        with os.fdopen(fd, "wb") as fh:
            if path.suffix == ".safetensors":
                safetensors_format.dump(state, {_META_KEY: json.dumps(meta.to_dict())}, fh)
            else:
                torch.save({"state_dict": state, "meta": meta.to_dict()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state_version(state)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(
    path: str | os.PathLike[str], *, arch: str | None = None, num_classes: int | None = None
) -> LoadedCheckpoint:
    """Read a checkpoint; returns ``(state, meta, version)``. Never runs pickled code.

    ``arch`` and ``num_classes`` are needed only for a bare state_dict ``.pt`` file.
    Raises CheckpointError (unreadable, corrupt, bare without arch), UnsafeCheckpointError
    (the file holds pickled objects, e.g. a whole model).
    """
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(where, f"cannot read: {exc.strerror or exc}") from None
    if _looks_like_safetensors(data):
        state, meta = _read_safetensors(where, data, arch=arch, num_classes=num_classes)
    else:
        state, meta = _read_torch(where, data, arch=arch, num_classes=num_classes)
    return LoadedCheckpoint(state, meta, state_version(state))


def _looks_like_safetensors(data: bytes) -> bool:
    # torch.save writes a zip (PK\x03\x04) or legacy pickle (\x80); safetensors starts with a
    # u64 length followed by '{'.
    return len(data) > 9 and data[8:9] == b"{"


def _read_safetensors(
    where: str, data: bytes, *, arch: str | None, num_classes: int | None
) -> tuple[State, CheckpointMeta]:
    try:
        state, metadata = safetensors_format.loads(data)
    except safetensors_format.SafetensorsFormatError as exc:
        raise CheckpointError(where, f"corrupt safetensors file: {exc}") from None
    if _META_KEY not in metadata:
        return state, _bare_meta(where, arch, num_classes)
    try:
        raw = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(where, f"headswap metadata is not JSON: {exc}") from None
    return state, _meta_from(where, raw)


def _read_torch(
    where: str, data: bytes, *, arch: str | None, num_classes: int | None
) -> tuple[State, CheckpointMeta]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line]
        detail = lines[0] if lines else type(exc).__name__
        if "Unsupported global" in detail:  # a GLOBAL opcode: the pickle names code to import
            detail = detail.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]
            raise UnsafeCheckpointError(where, detail) from None
        raise CheckpointError(where, f"not a readable checkpoint: {detail}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(where, f"not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and "meta" in obj:
        return _check_state(where, obj["state_dict"]), _meta_from(where, obj["meta"])
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _check_state(where, obj), _bare_meta(where, arch, num_classes)
    raise CheckpointError(where, f"expected a state_dict or a headswap checkpoint, found {type(obj).__name__}")


def _bare_meta(where: str, arch: str | None, num_classes: int | None) -> CheckpointMeta:
    if arch is None or num_classes is None:
        raise CheckpointError(
            where, "a bare state_dict without headswap metadata: name its architecture and class "
            "count (arch= and num_classes=, or --arch and --num-classes)"
        )
    try:
        return CheckpointMeta.for_arch(arch, [str(i) for i in range(num_classes)], name=Path(where).stem)
    except ValueError as exc:
        raise CheckpointError(where, str(exc)) from None


def _check_state(where: str, state: object) -> State:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(where, "state_dict must map names to tensors")
    return state


def _meta_from(where: str, raw: Any) -> CheckpointMeta:
    try:
        return CheckpointMeta.from_dict(raw, path=where)
    except TypeError as exc:
        raise CheckpointError(where, f"malformed metadata: {exc}") from None


def load_trusted_pickle(path: str | os.PathLike[str]) -> State:
    """Unpickle a whole model or a state_dict with arbitrary objects, and return its state.

    This RUNS CODE FROM THE FILE: call it only on the explicit opt-in of a user who trusts
    the file's author (``headswap convert --trust-pickle``). Raises CheckpointError when the
    file holds neither an ``nn.Module`` nor a mapping of tensors.
    """
    where = str(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # anything the pickle may raise; reported, not hidden
        raise CheckpointError(where, f"cannot unpickle ({type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict):
        return _check_state(where, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    raise CheckpointError(where, f"expected an nn.Module or a state_dict, found {type(obj).__name__}")
