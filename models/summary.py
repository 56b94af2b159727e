"""What ``headswap inspect`` says about a checkpoint, read from a ``.safetensors`` file without torch.

A safetensors file is an 8-byte header length, a JSON header (tensor names, dtypes, shapes,
byte offsets and the metadata) and the raw tensor bytes: everything ``inspect`` shows, the
version included (a hash of those names, dtypes, shapes and bytes), is there without building
a tensor, so the verb answers in milliseconds instead of seconds of importing torch and
torchvision. A ``.pt`` file needs torch to unpickle its tensors (never torchvision).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

from models.errors import CheckpointError
from models.meta import CheckpointMeta, cannot_read, content_version, meta_from_safetensors
from models.safetensors_file import SAFETENSORS_DTYPES, is_safetensors, open_safetensors

# State keys that are buffers, not parameters, in torchvision's classifiers: BatchNorm's
# statistics and the relative-position tables of swin and maxvit. tests/test_archs.py holds
# this against every architecture's named_parameters().
BUFFER_NAMES = frozenset({
    "running_mean", "running_var", "num_batches_tracked", "relative_position_index", "relative_coords_table",
})


def is_parameter(key: str) -> bool:
    """Whether the state key ``key`` of a torchvision classifier names a parameter (not a buffer)."""
    return key.rsplit(".", 1)[-1] not in BUFFER_NAMES


@dataclass(frozen=True)
class CheckpointSummary:
    """A checkpoint's version, metadata and tensor counts.

    ``dtypes`` counts tensors per dtype (torch's names), in the order of the tensor names;
    ``num_parameters`` counts the elements of the tensors that are parameters.
    """

    version: str
    meta: CheckpointMeta
    dtypes: dict[str, int]
    num_tensors: int
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        """The ``inspect --json`` object."""
        return {"version": self.version, "num_parameters": self.num_parameters, "dtypes": self.dtypes,
                "partial": self.meta.partial, "meta": self.meta.to_dict()}


def summarize(
    path: str | os.PathLike[str], *, arch: str | None = None, num_classes: int | None = None
) -> CheckpointSummary:
    """Summarise the checkpoint at ``path`` (``arch`` and ``num_classes`` name a bare state).

    Reads a ``.safetensors`` file without torch; any other file through ``load_checkpoint``.
    Raises what ``load_checkpoint`` raises for the same file: CheckpointError,
    UnsafeCheckpointError.
    """
    where = str(path)
    if not is_safetensors(path):
        return _summarize_torch(path, arch=arch, num_classes=num_classes)
    try:  # fh first, then the library's check: the check must be of the file fh reads
        with open(path, "rb") as fh, open_safetensors(where, path, "numpy") as f:
            if not os.path.samestat(os.fstat(fh.fileno()), os.stat(path)):
                raise CheckpointError(where, "the file was replaced while being read; read it again")
            meta = meta_from_safetensors(where, f.metadata() or {}, arch=arch, num_classes=num_classes)
            # The library has no torch-free way to hand over a tensor's bytes (numpy has no bfloat16),
            # nor their offsets: those come from the header it checked.
            header_size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_size))
            tensors = [(name, SAFETENSORS_DTYPES[header[name]["dtype"]], tuple(header[name]["shape"]))
                       for name in sorted(f.keys())]
            version = content_version(
                (name, dtype, shape, _read_at(where, fh, 8 + header_size, *header[name]["data_offsets"]))
                for name, dtype, shape in tensors
            )
    except OSError as exc:  # open() itself: open_safetensors turns the rest into CheckpointError
        raise cannot_read(where, exc) from None
    return CheckpointSummary(
        version, meta, _count(dtype for _, dtype, _ in tensors), len(tensors),
        sum(math.prod(shape) for name, _, shape in tensors if is_parameter(name)),
    )


def _read_at(where: str, fh: BinaryIO, data_start: int, begin: int, end: int) -> bytes:
    fh.seek(data_start + begin)
    data = fh.read(end - begin)
    if len(data) != end - begin:
        raise CheckpointError(where, "the file was truncated while being read; read it again")
    return data


def _summarize_torch(path: str | os.PathLike[str], *, arch: str | None, num_classes: int | None) -> CheckpointSummary:
    from models.checkpoint import load_checkpoint  # imports torch: only for files that need it

    loaded = load_checkpoint(path, arch=arch, num_classes=num_classes)
    return CheckpointSummary(
        loaded.version, loaded.meta, _count(str(t.dtype).removeprefix("torch.") for t in loaded.state.values()),
        len(loaded.state), sum(t.numel() for k, t in loaded.state.items() if is_parameter(k)),
    )


def _count(dtypes: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for dtype in dtypes:
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts
