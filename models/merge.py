"""Partial merges: the seed's "load some of a pretrained model" recipe, with a report.

The seed keeps ``{k: v for k, v in pretrained.items() if k in model_dict}``; this also checks
shapes, strips wrapper prefixes (``module.`` from DataParallel/DDP, ``_orig_mod.`` from
torch.compile) and says exactly what was taken and what was not (``models/merge_report.py``).
"""

from __future__ import annotations

import torch

from models.errors import IncompatibleCheckpointError
from models.merge_report import (  # noqa: F401 -- format_report: importable from here too
    MergeReport,
    ShapeMismatch,
    format_report,
)

DEFAULT_STRIP_PREFIXES = ("module.", "_orig_mod.")

State = dict[str, torch.Tensor]


def strip_prefixes(state: State, prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES) -> State:
    """Remove wrapper prefixes from every key, repeatedly (``module._orig_mod.x`` -> ``x``)."""
    out: State = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if prefix and key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def merge_state(
    target: State,
    source: State,
    *,
    min_match: float = 0.0,
    prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES,
) -> tuple[State, MergeReport]:
    """Merge ``source`` tensors into a copy of ``target`` where names and shapes agree.

    Returns ``(merged_state, report)``; ``target`` and ``source`` are not modified. Merged
    tensors take the target's dtype and device. Raises IncompatibleCheckpointError carrying
    the report when ``report.source_fraction < min_match`` (too little of the source fits).
    """
    if not 0.0 <= min_match <= 1.0:
        raise ValueError(f"min_match must be within [0, 1], found {min_match}")
    source = strip_prefixes(source, prefixes)
    merged_state = dict(target)
    merged: list[str] = []
    mismatched: list[ShapeMismatch] = []
    for key in sorted(source):
        if key not in target:
            continue
        src, dst = source[key], target[key]
        if src.shape != dst.shape:
            mismatched.append(ShapeMismatch(key, list(dst.shape), list(src.shape)))
            continue
        merged_state[key] = src.detach().to(device=dst.device, dtype=dst.dtype).clone()
        merged.append(key)
    total = sum(t.numel() for t in target.values())
    taken = sum(target[k].numel() for k in merged)
    report = MergeReport(
        merged=merged,
        shape_mismatched=mismatched,
        missing=sorted(k for k in target if k not in source),
        unexpected=sorted(k for k in source if k not in target),
        target_fraction=taken / total if total else 0.0,
        source_fraction=len(merged) / len(source) if source else 0.0,
        strip_prefixes=list(prefixes),
    )
    if report.source_fraction < min_match:
        raise IncompatibleCheckpointError(
            f"merge takes {report.source_fraction:.1%} of the source tensors, below min_match "
            f"{min_match:.1%} ({len(merged)} merged, {len(mismatched)} shape mismatches, "
            f"{len(report.unexpected)} unknown to the target)",
            report,
        )
    return merged_state, report
