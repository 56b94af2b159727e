"""What ``headswap inspect`` says about a checkpoint, read from a ``.safetensors`` file without torch.

A safetensors file is an 8-byte header length, a JSON header (tensor names, dtypes, shapes,
byte offsets and the metadata) and the raw tensor bytes: everything ``inspect`` shows, the
version included (a hash of those names, dtypes, shapes and bytes), is there without building
a tensor, so the verb answers in milliseconds instead of seconds of importing torch and
torchvision. A ``.pt`` file needs torch to unpickle its tensors (never torchvision).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from models import safetensors_format
from models.errors import CheckpointError
from models.meta import CheckpointMeta, content_version, meta_from_safetensors, read_checkpoint_file

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

    ``dtypes`` counts tensors per dtype (torch's names), in the order the file holds them;
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
    data = read_checkpoint_file(path)
    if not safetensors_format.looks_like_safetensors(data):
        return _summarize_torch(path, arch=arch, num_classes=num_classes)
    try:
        entries, metadata, body = safetensors_format.parse(data)
    except safetensors_format.SafetensorsFormatError as exc:
        raise CheckpointError(where, f"corrupt safetensors file: {exc}") from None
    meta = meta_from_safetensors(where, metadata, arch=arch, num_classes=num_classes)
    version = content_version(
        (e.name, e.dtype, e.shape, body[e.start:e.end]) for e in sorted(entries, key=lambda e: e.name)
    )
    return CheckpointSummary(
        version, meta, _count(e.dtype for e in entries), len(entries),
        sum(math.prod(e.shape) for e in entries if is_parameter(e.name)),
    )


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
