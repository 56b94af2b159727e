"""Checkpoints: a state_dict plus metadata, written atomically, read without unpickling code.

Two encodings share one meaning:

* ``.safetensors`` (preferred): tensors plus the metadata as JSON under the header's
  ``__metadata__["headswap"]`` key, written and read (memory-mapped) by the safetensors library.
* ``.pt``: ``torch.save({"state_dict": ..., "meta": {...}})``, read with ``weights_only=True``.

A bare ``.pt`` state_dict (``torch.save(model.state_dict(), PATH)``) loads when the caller
names the architecture and class count. A checkpoint's *version* is a content hash of its
tensors, so the same weights have the same version in either encoding.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from models.errors import CheckpointError, UnsafeCheckpointError
from models.meta import (  # noqa: F401 -- FORMAT_VERSION, SUFFIXES, VERSION_DIGITS, utc_now: importable from here too
    FORMAT_VERSION,
    META_KEY,
    SUFFIXES,
    VERSION_DIGITS,
    CheckpointMeta,
    bare_meta,
    content_version,
    meta_from,
    meta_from_safetensors,
    read_checkpoint_file,
    utc_now,
)
from models.safetensors_file import SAFETENSORS_DTYPES, is_safetensors, open_safetensors

State = dict[str, torch.Tensor]


class LoadedCheckpoint(NamedTuple):
    state: State
    meta: CheckpointMeta
    version: str


def state_version(state: State) -> str:
    """Content hash of a state: sha256 over names, dtypes, shapes and bytes, sorted by name.

    Returns the first 12 hex digits (``models.meta.content_version``). Independent of the file
    encoding and of the device.
    """
    return content_version(_hashed(key, state[key]) for key in sorted(state))


def _hashed(key: str, tensor: torch.Tensor) -> tuple[str, str, tuple[int, ...], memoryview]:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    return key, str(flat.dtype).removeprefix("torch."), tuple(tensor.shape), data


def save_checkpoint(path: str | os.PathLike[str], state: State, meta: CheckpointMeta) -> str:
    """Write ``state`` and ``meta`` atomically (temp file in the same folder, then rename).

    The encoding follows the suffix: ``.safetensors``, else ``.pt``/``.pth``. Returns the
    version. Raises ValueError for an unknown suffix, or a dtype that ``.safetensors`` does not hold.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: checkpoint suffix must be one of {', '.join(SUFFIXES)}, found {path.suffix!r}")
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    if path.suffix == ".safetensors":
        state = _for_safetensors(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)  # both encodings write the file by its name
    try:
        if path.suffix == ".safetensors":  # (newer versions of the library: a file of their own, renamed over tmp)
            save_file(state, tmp, metadata={META_KEY: json.dumps(meta.to_dict())})
        else:
            torch.save({"state_dict": state, "meta": meta.to_dict()}, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp and the library make 0600; a checkpoint is shared like any file
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return state_version(state)


def _for_safetensors(state: State) -> State:
    """``state`` as the safetensors writer takes it: known dtypes, contiguous, no shared bytes.

    Raises ValueError for a dtype outside ``SAFETENSORS_DTYPES``. Tensors whose bytes overlap
    another's (tied weights) get a copy each: the library refuses them, the old writer wrote
    them twice, and so does this.
    """
    torch_names = set(SAFETENSORS_DTYPES.values())
    out: State = {}
    for name, tensor in state.items():
        if str(tensor.dtype).removeprefix("torch.") not in torch_names:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        out[name] = tensor.contiguous()
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, name) for name, t in out.items() if t.nbytes)
    end = 0
    for start, stop, name in spans:
        if start < end:
            out[name] = out[name].clone()
        end = max(end, stop)
    return out


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(
    path: str | os.PathLike[str], *, arch: str | None = None, num_classes: int | None = None, private: bool = False
) -> LoadedCheckpoint:
    """Read a checkpoint; returns ``(state, meta, version)``. Never runs pickled code.

    ``arch`` and ``num_classes`` are needed only for a bare state_dict file. The tensors of a
    ``.safetensors`` file are memory-mapped: they read the file for as long as they live, so
    replace a checkpoint by writing beside it and renaming (as ``save_checkpoint`` does), never
    by rewriting it in place -- a file truncated under a mapping kills its reader (SIGBUS). With
    ``private`` the tensors are copied into memory while the file is open, for files that others
    may rewrite in place (a shared checkpoint store).
    Raises CheckpointError (unreadable, corrupt, bare without arch), UnsafeCheckpointError
    (the file holds pickled objects, e.g. a whole model).
    """
    where = str(path)
    if is_safetensors(path):
        state, meta = _read_safetensors(where, path, arch=arch, num_classes=num_classes, private=private)
    else:
        state, meta = _read_torch(where, read_checkpoint_file(path), arch=arch, num_classes=num_classes)
    return LoadedCheckpoint(state, meta, state_version(state))


def _read_safetensors(
    where: str, path: str | os.PathLike[str], *, arch: str | None, num_classes: int | None, private: bool = False
) -> tuple[State, CheckpointMeta]:
    """The tensors (in name order, memory-mapped from the file, or copies with ``private``) and the
    metadata of a checked file."""
    with open_safetensors(where, path, "pt") as f:
        metadata = f.metadata() or {}
        state = {name: f.get_tensor(name).clone() if private else f.get_tensor(name) for name in sorted(f.keys())}
    return state, meta_from_safetensors(where, metadata, arch=arch, num_classes=num_classes)


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
        return _check_state(where, obj["state_dict"]), meta_from(where, obj["meta"])
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _check_state(where, obj), bare_meta(where, arch, num_classes)
    raise CheckpointError(where, f"expected a state_dict or a headswap checkpoint, found {type(obj).__name__}")


def _check_state(where: str, state: object) -> State:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(where, "state_dict must map names to tensors")
    return state


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
