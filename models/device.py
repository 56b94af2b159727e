"""Which torch device a ``--device`` name means: for training and for the serving workers alike."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; raises ValueError for unavailable CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but torch finds no CUDA device")
    return torch.device(name)
