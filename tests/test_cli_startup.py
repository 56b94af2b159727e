"""The CLI's first commands start without torch: every ``--help``, ``archs``, ``inspect`` of a .safetensors file.

Held by what each command imports, not by a clock (the timings are in docs/quickstart.md):
importing torch and torchvision is most of a second to several seconds, everything else here
is milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser

HEAVY = ("torch", "torchvision")


def _verbs() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def _heavy_imports_of(argv: list[str]) -> tuple[list[str], str]:
    """Run ``headswap ARGV`` in a fresh interpreter; returns the heavy modules it imported and its stdout."""
    code = (
        "import contextlib, io, json, sys\n"
        "from service.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        code = main({argv!r})\n"
        "    except SystemExit as exc:\n"
        "        code = exc.code\n"
        f"print(json.dumps([code, [m for m in {HEAVY!r} if m in sys.modules], out.getvalue()]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    status, heavy, stdout = json.loads(proc.stdout.splitlines()[-1])
    assert status in (0, None), proc.stderr
    return heavy, stdout


@pytest.mark.parametrize("argv", [["--help"], *[[verb, "--help"] for verb in _verbs()], ["archs"], ["archs", "--json"]],
                         ids=" ".join)
def test_help_and_archs_import_neither_torch_nor_torchvision(argv: list[str]) -> None:
    heavy, stdout = _heavy_imports_of(argv)
    assert heavy == [] and stdout


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_inspect_of_a_safetensors_file_imports_neither(resnet18_ckpt: Path, json_flag: list[str]) -> None:
    heavy, stdout = _heavy_imports_of(["inspect", str(resnet18_ckpt), *json_flag])
    assert heavy == [] and "version" in stdout


def test_the_models_package_imports_its_names_on_first_use() -> None:
    code = ("import sys, models\n"
            "from models import ARCHS, CheckpointMeta, CheckpointError\n"
            "from models import recipe, summary, demo_data\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]"
    import models
    from models import load_classifier
    from models.build import load_classifier as direct

    assert load_classifier is direct and models.load_classifier is direct
    assert set(models.__all__) <= set(dir(models))
    with pytest.raises(AttributeError, match="module 'models' has no attribute 'nothing'"):
        models.nothing  # noqa: B018


