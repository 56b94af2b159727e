"""Shared fixtures: small real checkpoints made on the spot (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models import CheckpointMeta, build_classifier, save_checkpoint
from tests.server import Server, run_server

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


@pytest.fixture(scope="session")
def server(resnet18_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server shared by the HTTP tests that do not change what it serves."""
    tmp = tmp_path_factory.mktemp("serve")
    with run_server(resnet18_ckpt, tmp, "--workers-per-device", "2", "--max-batch-size", "8",
                    "--batch-timeout-ms", "20", "--max-image-bytes", "2000000", "--max-image-pixels", "4000000") as srv:
        yield srv
