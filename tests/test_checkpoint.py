"""Checkpoint encodings, versions, safety and atomicity."""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import struct
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
from models.summary import summarize
from tests.conftest import CLASSES7

DATA = Path(__file__).parent / "data"


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


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_written_files_are_shared_as_the_umask_says(tmp_path: Path, suffix: str) -> None:
    """As a file written with open() would be, not the 0600 of the temporary files they are written as."""
    previous = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / f"m{suffix}", {"w": torch.zeros(2)}, _meta())
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / f"m{suffix}").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == [f"m{suffix}"]


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


def test_files_of_the_reference_writer_load(tmp_path: Path, model: torch.nn.Module) -> None:
    """Any safetensors writer's file loads, every dtype headswap holds included (0-d and empty tensors)."""
    mixed = {"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16),
             "c": torch.tensor(True), "d": torch.empty(0, 4), "e": torch.tensor([-1, 2], dtype=torch.int8),
             "f": torch.ones(2, dtype=torch.float16), "g": torch.ones(1, dtype=torch.float64),
             "h": torch.tensor([7], dtype=torch.int32), "i": torch.tensor([-3], dtype=torch.int16),
             "j": torch.tensor([255], dtype=torch.uint8)}
    safetensors.torch.save_file(mixed, tmp_path / "ref.safetensors", metadata={"headswap": json.dumps(_meta().to_dict())})
    loaded = load_checkpoint(tmp_path / "ref.safetensors")
    assert loaded.meta.arch == "resnet18" and list(loaded.state) == sorted(mixed)
    for key, tensor in mixed.items():
        assert loaded.state[key].dtype == tensor.dtype and torch.equal(loaded.state[key], tensor), key
    assert loaded.version == state_version(mixed) == summarize(tmp_path / "ref.safetensors").version


def test_loading_memory_maps_the_file(resnet18_ckpt: Path) -> None:
    """Every tensor's bytes lie in a mapping of the file itself (Linux's /proc/self/maps), not in memory of
    their own that the file was read and copied into."""
    state = load_checkpoint(resnet18_ckpt).state
    lines = Path("/proc/self/maps").read_text().splitlines()
    mapped = [[int(a, 16) for a in line.split()[0].split("-")] for line in lines if line.endswith(str(resnet18_ckpt.resolve()))]
    assert mapped
    assert all(any(low <= t.data_ptr() < high for low, high in mapped) for t in state.values())


def test_a_private_load_holds_no_mapping_of_the_file(resnet18_ckpt: Path, tmp_path: Path) -> None:
    """``private`` (what the server uses for its checkpoint store, whose files a user may rewrite in
    place): the tensors are copies, and truncating the file afterwards changes nothing."""
    path = tmp_path / "copy.safetensors"
    path.write_bytes(resnet18_ckpt.read_bytes())
    loaded = load_checkpoint(path, private=True)
    lines = Path("/proc/self/maps").read_text().splitlines()
    mapped = [[int(a, 16) for a in line.split()[0].split("-")] for line in lines if line.endswith(str(path.resolve()))]
    assert not any(low <= t.data_ptr() < high for low, high in mapped for t in loaded.state.values())
    with open(path, "r+b") as fh:
        fh.truncate(16)  # what a `cp` over the file does first
    assert state_version(loaded.state) == loaded.version == load_checkpoint(resnet18_ckpt).version


def test_a_file_of_the_hand_written_writer_keeps_its_version(tmp_path: Path) -> None:
    """``old-writer.safetensors`` was written by ``models/safetensors_format.dump`` (removed for the
    safetensors library): tensors in name order, the header's JSON without spaces. It loads with the
    version it had, in both readers, and re-saving its state keeps that version."""
    expected = {
        "a.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
        "b.num_batches_tracked": torch.tensor(3),
        "c.mask": torch.tensor([True, False, True]),
        "d.empty": torch.zeros(0, 4, dtype=torch.float16),
        "e.small": torch.tensor([-1, 2], dtype=torch.int8),
    }
    path = DATA / "old-writer.safetensors"
    loaded = load_checkpoint(path)
    assert loaded.version == state_version(expected) == summarize(path).version == "bd5488ccbf1a"
    assert list(loaded.state) == list(expected)
    for key, tensor in expected.items():
        assert loaded.state[key].dtype == tensor.dtype and torch.equal(loaded.state[key], tensor), key
    assert loaded.meta == CheckpointMeta.for_arch("resnet18", ["cat", "dog"], name="old-writer",
                                                   created_at="2026-12-01T00:00:00+00:00")
    assert save_checkpoint(tmp_path / "resaved.safetensors", loaded.state, loaded.meta) == "bd5488ccbf1a"


def _safetensors_file(path: Path, header: object, body: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, body",
    [
        pytest.param({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), id="size"),
        pytest.param({"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), id="overlap"),
        pytest.param({"x": F32x2, "y": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20), id="gap"),
        pytest.param({"x": F32x2}, bytes(12), id="trailing-bytes"),
        pytest.param({"x": F32x2}, bytes(4), id="short-data"),
        pytest.param({"x": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), id="dtype"),
        pytest.param({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), id="negative"),
        pytest.param({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, bytes(8), id="overflow"),
        pytest.param({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), id="reversed"),
        pytest.param({"__metadata__": {"headswap": 1}, "x": F32x2}, bytes(8), id="metadata-not-strings"),
        pytest.param({"x": {"dtype": "F32", "shape": [2], "offsets": [0, 8]}}, bytes(8), id="no-offsets"),
    ],
)
def test_lying_safetensors_headers_are_refused_by_both_readers(tmp_path: Path, header: object, body: bytes) -> None:
    """The library's checks, as the hand-written reader made them (its messages are the library's own)."""
    path = _safetensors_file(tmp_path / "lie.safetensors", header, body)
    for read in (load_checkpoint, summarize):
        with pytest.raises(CheckpointError, match="lie.safetensors: corrupt safetensors file: "):
            read(path, arch="resnet18", num_classes=7)


@pytest.mark.parametrize("code, size", [("U16", 2), ("U32", 4), ("U64", 8)])
def test_dtypes_the_library_knows_and_headswap_does_not_are_refused(tmp_path: Path, code: str, size: int) -> None:
    """The one check kept on top of the library's: the dtypes headswap reads (models.meta.SAFETENSORS_DTYPES)."""
    path = _safetensors_file(tmp_path / "odd.safetensors", {"x": {"dtype": code, "shape": [1], "data_offsets": [0, size]}},
                             bytes(size))
    for read in (load_checkpoint, summarize):
        with pytest.raises(CheckpointError, match=f"unsupported safetensors dtype: tensor 'x' is {code}, expected one of F64"):
            read(path, arch="resnet18", num_classes=7)


@pytest.mark.parametrize("field, value", [("input_size", "224"), ("mean", "imagenet"), ("class_names", [1, 2]),
                                          ("resize_size", 0), ("arch_kwargs", []), ("partial", "no")])
def test_malformed_metadata_fields_are_checkpoint_errors(tmp_path: Path, field: str, value: object) -> None:
    meta = {**CheckpointMeta.for_arch("resnet18", ["a", "b"]).to_dict(), field: value}
    path = _safetensors_file(tmp_path / "meta.safetensors", {"__metadata__": {"headswap": json.dumps(meta)}, "x": F32x2},
                             bytes(8))
    with pytest.raises(CheckpointError, match=re.escape(f"malformed metadata: {field} is {value!r}")):
        load_checkpoint(path)


def test_tied_tensors_are_written_twice(tmp_path: Path) -> None:
    shared = torch.arange(4.0)
    state = {"a": shared, "b": shared, "c": shared[2:]}  # the library alone refuses tensors that share bytes
    version = save_checkpoint(tmp_path / "tied.safetensors", state, _meta())
    loaded = load_checkpoint(tmp_path / "tied.safetensors")
    assert version == loaded.version and all(torch.equal(loaded.state[k], v) for k, v in state.items())


def test_load_classifier_restores_eval_model_that_predicts_like_the_original(resnet18_ckpt: Path) -> None:
    torch.manual_seed(0)
    original = build_classifier("resnet18", 7).eval()
    model, meta = load_classifier(resnet18_ckpt)
    assert not model.training and meta.class_names == CLASSES7
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_of_a_module_that_reads_its_version_loads(tmp_path: Path, suffix: str) -> None:
    # mnasnet's loader reads its module version from the state's metadata, which no file keeps
    torch.manual_seed(0)
    original = build_classifier("mnasnet0_5", 3).eval()
    save_checkpoint(tmp_path / f"m{suffix}", original.state_dict(), CheckpointMeta.for_arch("mnasnet0_5", ["a", "b", "c"]))
    model, _ = load_classifier(tmp_path / f"m{suffix}")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), original(x))


def test_meta_pickle_free_in_pt_files(tmp_path: Path, model: torch.nn.Module) -> None:
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), _meta())
    with open(tmp_path / "m.pt", "rb") as fh:
        obj = torch.load(fh, weights_only=True)  # loads under the strict unpickler: plain data only
    assert set(obj) == {"state_dict", "meta"} and obj["meta"]["arch"] == "resnet18"
    assert pickle.HIGHEST_PROTOCOL >= 2
