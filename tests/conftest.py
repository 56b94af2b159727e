"""Shared fixtures: small real checkpoints made on the spot (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import CheckpointMeta, build_classifier, save_checkpoint

CLASSES7 = [f"class{i}" for i in range(7)]


def make_checkpoint(path: Path, arch: str = "resnet18", classes: list[str] = CLASSES7, seed: int = 0) -> str:
    """Build ``arch`` with a fresh head, seed its weights, save it; returns the version."""
    torch.manual_seed(seed)
    model = build_classifier(arch, len(classes))
    return save_checkpoint(path, model.state_dict(), CheckpointMeta.for_arch(arch, classes, name=f"{arch}-test"))


@pytest.fixture(scope="session")
def resnet18_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-7.safetensors"
    make_checkpoint(path)
    return path
