"""Checkpoint encodings, versions, safety and atomicity."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models import (
    CheckpointError,
    CheckpointMeta,
    UnsafeCheckpointError,
    build_classifier,
    load_checkpoint,
    load_classifier,
    save_checkpoint,
    state_version,
)
from models.safetensors_format import SafetensorsFormatError, loads
from tests.conftest import CLASSES7


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_classifier("resnet18", 7)


def _meta() -> CheckpointMeta:
    return CheckpointMeta.for_arch("resnet18", CLASSES7, name="rt", training={"epochs": 3})


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_bit_exact_and_keeps_version(tmp_path: Path, model: torch.nn.Module, suffix: str) -> None:
    state = model.state_dict()
    version = save_checkpoint(tmp_path / f"m{suffix}", state, _meta())
    loaded = load_checkpoint(tmp_path / f"m{suffix}")
    assert loaded.version == version == state_version(state)
    assert list(loaded.state) == list(state) or set(loaded.state) == set(state)
    for key, tensor in state.items():
        assert loaded.state[key].dtype == tensor.dtype
        assert torch.equal(loaded.state[key], tensor), key
    assert loaded.meta == _meta().__class__(**{**_meta().to_dict(), "created_at": loaded.meta.created_at})
    assert loaded.meta.training == {"epochs": 3}


def test_version_is_the_same_in_both_encodings_and_changes_with_weights(tmp_path: Path, model: torch.nn.Module) -> None:
    state = model.state_dict()
    v1 = save_checkpoint(tmp_path / "a.safetensors", state, _meta())
    v2 = save_checkpoint(tmp_path / "a.pt", state, _meta())
    assert v1 == v2 and len(v1) == 12
    changed = dict(state, **{"fc.bias": state["fc.bias"] + 1})
    assert state_version(changed) != v1
    assert state_version({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}) != v1


def test_seed_style_bare_state_dict_loads_with_arch(tmp_path: Path, model: torch.nn.Module) -> None:
    torch.save(model.state_dict(), tmp_path / "model.pth")  # the seed's "Method 1"
    with pytest.raises(CheckpointError, match="bare state_dict.*num_classes"):
        load_checkpoint(tmp_path / "model.pth")
    loaded = load_checkpoint(tmp_path / "model.pth", arch="resnet18", num_classes=7)
    assert loaded.meta.arch == "resnet18" and loaded.meta.num_classes == 7
    assert loaded.version == state_version(model.state_dict())


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: the attack a weights_only load blocks."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_code_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert isinstance(info.value, CheckpointError)
    # and the control: unpickling it for real does run the code, so the test can fail
    with open(tmp_path / "evil.pt", "rb") as fh:
        torch.load(fh, weights_only=False)
    assert marker.exists()


def test_whole_pickled_model_is_refused_with_the_opt_in_named(tmp_path: Path, model: torch.nn.Module) -> None:
    torch.save(model, tmp_path / "whole.pt")  # the seed's "Method 2"
    with pytest.raises(UnsafeCheckpointError, match=r"headswap convert .*--trust-pickle"):
        load_checkpoint(tmp_path / "whole.pt")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "cannot read|not a readable"),
        (b"garbage" * 10, "not a readable"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", "corrupt safetensors"),
    ],
)
def test_corrupt_files_raise_checkpoint_error(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(tmp_path / "bad.pt")


def test_truncated_checkpoints_raise_checkpoint_error(tmp_path: Path, resnet18_ckpt: Path, model: torch.nn.Module) -> None:
    data = resnet18_ckpt.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    save_checkpoint(tmp_path / "full.pt", model.state_dict(), _meta())
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "keep.safetensors"
    version = save_checkpoint(path, model.state_dict(), _meta())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="complex64 has no safetensors code"):
        save_checkpoint(path, {"x": torch.zeros(2, dtype=torch.complex64)}, _meta())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.safetensors"]
    assert load_checkpoint(path).version == version


def test_our_safetensors_interoperate_with_the_reference_library(tmp_path: Path, model: torch.nn.Module) -> None:
    state = model.state_dict()
    save_checkpoint(tmp_path / "ours.safetensors", state, _meta())
    theirs = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(state) and all(torch.equal(theirs[k], state[k]) for k in state)
    mixed = {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16),
             "c": torch.tensor(True), "d": torch.empty(0, 4)}
    safetensors.torch.save_file(mixed, tmp_path / "ref.safetensors", metadata={"headswap": json.dumps(_meta().to_dict())})
    tensors, metadata = loads((tmp_path / "ref.safetensors").read_bytes())
    assert json.loads(metadata["headswap"])["arch"] == "resnet18"
    for key, tensor in mixed.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor)


@pytest.mark.parametrize(
    "header, message",
    [
        ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "needs 16 bytes"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "gap, overlap"),
        ({"x": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, "is not one of"),
        ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative"),
        ({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, "needs"),
    ],
)
def test_safetensors_reader_rejects_lying_headers(header: dict, message: str) -> None:
    raw = json.dumps(header).encode()
    with pytest.raises(SafetensorsFormatError, match=message):
        loads(len(raw).to_bytes(8, "little") + raw + bytes(8))


def test_load_classifier_restores_eval_model_that_predicts_like_the_original(resnet18_ckpt: Path) -> None:
    torch.manual_seed(0)
    original = build_classifier("resnet18", 7).eval()
    model, meta = load_classifier(resnet18_ckpt)
    assert not model.training and meta.class_names == CLASSES7
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))


def test_meta_pickle_free_in_pt_files(tmp_path: Path, model: torch.nn.Module) -> None:
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), _meta())
    with open(tmp_path / "m.pt", "rb") as fh:
        obj = torch.load(fh, weights_only=True)  # loads under the strict unpickler: plain data only
    assert set(obj) == {"state_dict", "meta"} and obj["meta"]["arch"] == "resnet18"
    assert pickle.HIGHEST_PROTOCOL >= 2
