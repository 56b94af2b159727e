"""The first CLI verbs: archs, inspect, merge, slice, convert; errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models import ARCHS, CheckpointMeta, build_classifier, load_checkpoint, load_classifier, save_checkpoint, skeleton
from models import state_version
from models.errors import WeightsUnavailableError
from service.cli import main
from tests.conftest import make_checkpoint


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_archs_json_lists_every_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "archs", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["arch"] for r in rows} == set(ARCHS)
    by_arch = {r["arch"]: r for r in rows}
    assert by_arch["resnet18"] == {"arch": "resnet18", "head": "fc", "input_size": 224, "num_parameters": 11689512}
    assert by_arch["squeezenet1_1"]["head"] == "classifier.1"
    assert by_arch["inception_v3"]["input_size"] == 299


def test_inspect_json(capsys: pytest.CaptureFixture[str], resnet18_ckpt: Path) -> None:
    code, out, _ = _run(capsys, "inspect", str(resnet18_ckpt), "--json")
    info = json.loads(out)
    assert code == 0
    assert info["version"] == load_checkpoint(resnet18_ckpt).version
    assert info["num_parameters"] == 11689512 - 1000 * 513 + 7 * 513
    assert info["dtypes"] == {"float32": 102, "int64": 20}
    assert info["partial"] is False
    assert {"arch", "num_classes", "class_names", "input_size", "mean", "std", "name", "created_at",
            "parent_version", "training"} <= set(info["meta"])
    assert info["meta"]["num_classes"] == 7


def _inspect_by_building_the_model(path: Path, *extra: str) -> tuple[dict[str, object], str]:
    """What `inspect` printed when it loaded every tensor and built the architecture to tell
    parameters from buffers: the reference its torch-free reading of the header must match."""
    kwargs = {"arch": extra[1], "num_classes": int(extra[3])} if extra else {}
    loaded = load_checkpoint(path, **kwargs)  # type: ignore[arg-type]
    params = dict(skeleton(loaded.meta.arch, loaded.meta.num_classes, arch_kwargs=loaded.meta.arch_kwargs)
                  .named_parameters())
    dtypes: dict[str, int] = {}
    for tensor in loaded.state.values():
        name = str(tensor.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    meta = loaded.meta
    info = {"version": loaded.version, "num_parameters": sum(t.numel() for k, t in loaded.state.items() if k in params),
            "dtypes": dtypes, "partial": meta.partial, "meta": meta.to_dict()}
    text = (f"{path}\n  version      {loaded.version}\n  name         {meta.name}\n"
            f"  arch         {meta.arch}{' (partial)' if meta.partial else ''}\n"
            f"  classes      {meta.num_classes}: {', '.join(meta.class_names[:10])}{' ...' if meta.num_classes > 10 else ''}\n"
            f"  parameters   {info['num_parameters']:,d} in {len(loaded.state)} tensors "
            f"({', '.join(f'{k}: {v}' for k, v in dtypes.items())})\n"
            f"  input        {meta.input_size}px (resize {meta.resize_size}, {meta.interpolation}), "
            f"mean {meta.mean}, std {meta.std}\n"
            f"  created      {meta.created_at}  parent {meta.parent_version or '-'}\n"
            + (f"  training     {json.dumps(meta.training)}\n" if meta.training else ""))
    return info, text


@pytest.fixture(scope="module")
def inspected(resnet18_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Checkpoints of every kind inspect reads: BatchNorm buffers, swin's relative-position buffers,
    no buffers, bf16, a training summary, partial, .pt, and bare states named on the command line."""
    tmp = tmp_path_factory.mktemp("inspect")
    torch.manual_seed(0)
    swin = build_classifier("swin_t", 3)
    swin.features = swin.features[:2]  # a small file; its keys are still swin's, buffers included
    swin_meta = CheckpointMeta.for_arch("swin_t", ["a", "b", "c"], training={"epochs": 1, "lr": 0.001})
    save_checkpoint(tmp / "swin.safetensors", swin.state_dict(), swin_meta)
    squeeze = build_classifier("squeezenet1_1", 12)
    classes = [f"c{i}" for i in range(12)]
    half = {k: v.to(torch.bfloat16) for k, v in squeeze.state_dict().items()}
    save_checkpoint(tmp / "squeeze-bf16.safetensors", half, CheckpointMeta.for_arch("squeezenet1_1", classes))
    assert main(["slice", str(resnet18_ckpt), "--out", str(tmp / "head.safetensors"), "--head"]) == 0
    assert main(["convert", str(resnet18_ckpt), "--out", str(tmp / "r18.pt")]) == 0
    safetensors.torch.save_file(squeeze.state_dict(), tmp / "bare.safetensors")  # no metadata at all
    torch.save(squeeze.state_dict(), tmp / "bare.pth")
    bare = ["--arch", "squeezenet1_1", "--num-classes", "12"]
    return {"resnet18": (resnet18_ckpt, []), "swin": (tmp / "swin.safetensors", []),
            "bf16": (tmp / "squeeze-bf16.safetensors", []), "partial": (tmp / "head.safetensors", []),
            "pt": (tmp / "r18.pt", []), "bare": (tmp / "bare.safetensors", bare), "bare-pt": (tmp / "bare.pth", bare)}


@pytest.mark.parametrize("kind", ["resnet18", "swin", "bf16", "partial", "pt", "bare", "bare-pt"])
def test_inspect_says_what_it_said_when_it_built_the_model(
    capsys: pytest.CaptureFixture[str], inspected: dict[str, tuple[Path, list[str]]], kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, extra = inspected[kind]
    monkeypatch.setattr("models.meta.utc_now", lambda: "2026-01-02T03:04:05+00:00")  # a bare state's "created"
    capsys.readouterr()
    info, text = _inspect_by_building_the_model(path, *extra)
    assert _run(capsys, "inspect", str(path), *extra) == (0, text, "")
    code, out, _ = _run(capsys, "inspect", str(path), "--json", *extra)
    assert code == 0 and json.loads(out) == info


def test_slice_head_then_merge_changes_exactly_the_head(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, resnet18_ckpt: Path
) -> None:
    make_checkpoint(tmp_path / "other.safetensors", seed=5)
    code, out, _ = _run(capsys, "slice", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "head.safetensors"), "--head")
    assert code == 0 and "2 of 122 tensors" in out
    head = load_checkpoint(tmp_path / "head.safetensors")
    assert head.meta.partial and sorted(head.state) == ["fc.bias", "fc.weight"]
    code, out, _ = _run(capsys, "merge", "--into", str(resnet18_ckpt), "--from", str(tmp_path / "head.safetensors"),
                        "--out", str(tmp_path / "merged.safetensors"), "--min-match", "1", "--json")
    report = json.loads(out)
    assert code == 0 and report["merged"] == ["fc.bias", "fc.weight"] and report["source_fraction"] == 1.0
    base, merged = load_checkpoint(resnet18_ckpt), load_checkpoint(tmp_path / "merged.safetensors")
    assert report["version"] == merged.version != base.version
    assert merged.meta.parent_version == base.version
    for key in base.state:
        expected = head.state[key] if key.startswith("fc.") else base.state[key]
        assert torch.equal(merged.state[key], expected), key


def test_slice_include_exclude(capsys: pytest.CaptureFixture[str], tmp_path: Path, resnet18_ckpt: Path) -> None:
    code, _, _ = _run(capsys, "slice", str(resnet18_ckpt), "--out", str(tmp_path / "l4.pt"),
                      "--include", "layer4.*", "--exclude", "*.num_batches_tracked")
    keys = set(load_checkpoint(tmp_path / "l4.pt").state)
    assert code == 0 and keys and all(k.startswith("layer4.") and "num_batches" not in k for k in keys)


def test_merge_below_min_match_fails_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, resnet18_ckpt: Path) -> None:
    make_checkpoint(tmp_path / "sq.safetensors", arch="squeezenet1_1")
    code, out, err = _run(capsys, "merge", "--into", str(resnet18_ckpt), "--from", str(tmp_path / "sq.safetensors"),
                          "--out", str(tmp_path / "x.safetensors"), "--min-match", "0.5")
    assert code == 1 and out == ""
    assert err.startswith("headswap: error: merge takes 0.0% of the source tensors, below min_match 50.0%")
    assert err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


def test_convert_bare_state_dict(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = build_classifier("resnet18", 4)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    code, _, err = _run(capsys, "convert", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "c.safetensors"))
    assert code == 1 and "--num-classes" in err
    code, out, _ = _run(capsys, "convert", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "c.safetensors"),
                        "--arch", "resnet18", "--num-classes", "4")
    assert code == 0 and load_checkpoint(tmp_path / "c.safetensors").version == state_version(model.state_dict())


def test_convert_bare_state_dict_of_the_wrong_arch_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(build_classifier("resnet34", 4).state_dict(), tmp_path / "bare.pth")
    code, _, err = _run(capsys, "convert", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "c.safetensors"),
                        "--arch", "resnet18", "--num-classes", "4")
    assert code == 1 and "state does not fit resnet18 with 4 classes" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_convert_pickled_model_needs_trust_pickle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = build_classifier("squeezenet1_1", 5).eval()
    torch.save(model, tmp_path / "whole.pt")
    code, _, err = _run(capsys, "convert", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "s.safetensors"))
    assert code == 1 and "--trust-pickle" in err and "Traceback" not in err
    code, _, _ = _run(capsys, "convert", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "s.safetensors"),
                      "--arch", "squeezenet1_1", "--trust-pickle")
    assert code == 0
    restored, meta = load_classifier(tmp_path / "s.safetensors")
    x = torch.randn(1, 3, 64, 64)
    assert meta.num_classes == 5 and torch.equal(restored(x), model(x))


def test_convert_trust_pickle_of_an_unknown_arch_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    torch.save(build_classifier("squeezenet1_1", 5), tmp_path / "whole.pt")
    code, _, err = _run(capsys, "convert", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "s.safetensors"),
                        "--arch", "squeezenet1_2", "--trust-pickle")
    assert (code, err.count("\n")) == (1, 1)
    assert err.startswith("headswap: error: unknown architecture 'squeezenet1_2'")


@pytest.mark.parametrize("bug", [TypeError, KeyError, AttributeError, RuntimeError])
def test_bugs_are_not_reported_as_user_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, resnet18_ckpt: Path, bug: type[Exception]
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise bug("a bug")

    monkeypatch.setattr("models.commands.checkpoints.summarize", broken)
    with pytest.raises(bug, match="a bug"):
        main(["inspect", str(resnet18_ckpt)])


def test_unavailable_weights_are_a_user_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                              resnet18_ckpt: Path) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise WeightsUnavailableError("resnet18", "DEFAULT", "no network")

    monkeypatch.setattr("models.commands.checkpoints.summarize", offline)
    code, _, err = _run(capsys, "inspect", str(resnet18_ckpt))
    assert (code, err.count("\n")) == (1, 1) and err.startswith("headswap: error: ")


def test_console_script_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "headswap"
    proc = subprocess.run([str(exe), "inspect", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("headswap: error:") and "cannot read" in proc.stderr and proc.stderr.count("\n") == 1
    debug = subprocess.run([str(exe), "--debug", "inspect", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
