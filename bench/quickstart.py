"""``make bench-quickstart``: the README's quickstart, run as written in a fresh folder, timed.

Runs the installed ``headswap`` as a new user would: ``demo-data data/ --task shapes`` and
``finetune --arch resnet18 --data data/ --out ckpt/shapes.safetensors`` with no other flag,
then ``--help`` of the command and of every verb, ``archs`` and ``inspect`` of the checkpoint.
The two commands run once with this CPU's own kernels and once with torch and oneDNN held to
AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), which is what a CPU without
AVX-512 runs: slower, and numerically a different run. Writes ``docs/quickstart.md``: wall
times, each checkpoint's best validation accuracy, the expected time ``finetune`` announced,
the machine and its load; checks the targets (every ``--help`` under 1 s, ``archs`` under
2 s, the two commands under 10 minutes with a best validation accuracy of at least 0.90)
and says plainly which are missed.

    python -m bench.quickstart [--out docs/quickstart.md] [--workdir DIR] [--repeats 3] [--isa native avx2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADSWAP = str(Path(sys.executable).parent / "headswap")
CHECKPOINT = "ckpt/shapes.safetensors"
QUICKSTART = [
    ["demo-data", "data/", "--task", "shapes"],
    ["finetune", "--arch", "resnet18", "--data", "data/", "--out", CHECKPOINT],
]
ISAS = {
    "native": ("this CPU's own kernels", {}),
    "avx2": ("torch and oneDNN held to AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}
HELP_TARGET_S, ARCHS_TARGET_S, QUICKSTART_TARGET_S, ACCURACY_TARGET = 1.0, 2.0, 600.0, 0.90
CHANCE = 1 / 6


@dataclass(frozen=True)
class Timed:
    argv: list[str]
    seconds: float
    stdout: str
    stderr: str


@dataclass(frozen=True)
class QuickstartRun:
    """The two quickstart commands in one fresh folder, and what the checkpoint says."""

    isa: str
    steps: list[Timed]
    training: dict[str, object]
    input_size: int

    @property
    def seconds(self) -> float:
        return sum(step.seconds for step in self.steps)

    @property
    def accuracy(self) -> float:
        return float(self.training["best_val_accuracy"])  # type: ignore[arg-type]


@dataclass
class Report:
    machine: dict[str, object]
    repeats: int
    runs: list[QuickstartRun] = field(default_factory=list)
    startup: dict[str, tuple[float, float]] = field(default_factory=dict)  # command -> (median, worst) seconds


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run ``headswap ARGV`` in ``cwd``; raises CalledProcessError when it fails."""
    start = time.perf_counter()
    proc = subprocess.run([HEADSWAP, *argv], cwd=cwd, capture_output=True, text=True, check=True,
                          env={**os.environ, **(env or {})})
    return Timed(argv, time.perf_counter() - start, proc.stdout, proc.stderr)


def median_and_worst(argv: list[str], cwd: Path, repeats: int) -> tuple[float, float]:
    """Median and worst wall time of ``repeats`` runs (the first one included: a new user's is cold)."""
    times = [run(argv, cwd).seconds for _ in range(repeats)]
    return statistics.median(times), max(times)


def verbs() -> list[str]:
    from service.cli import build_parser  # argparse and the torch-free models modules only

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    versions = subprocess.run([sys.executable, "-c", "import torch, torchvision; print(torch.__version__, "
                               "torchvision.__version__)"], capture_output=True, text=True, check=True).stdout.split()
    return {"cpu": model, "cores": os.cpu_count(), "avx512": "avx512f" in flags, "python": platform.python_version(),
            "torch": versions[0], "torchvision": versions[1], "date": datetime.date.today().isoformat(),
            "load_before": os.getloadavg()}


def quickstart(folder: Path, isa: str) -> QuickstartRun:
    folder.mkdir(parents=True)
    steps = [run(argv, folder, ISAS[isa][1]) for argv in QUICKSTART]
    info = json.loads(run(["inspect", CHECKPOINT, "--json"], folder).stdout)
    training = {k: info["meta"]["training"][k] for k in (
        "best_val_accuracy", "best_epoch", "epochs", "optimizer", "lr", "weight_decay", "image_size", "batch_size")}
    return QuickstartRun(isa, steps, training, info["meta"]["input_size"])


def measure(workdir: Path, repeats: int, isas: list[str]) -> Report:
    report = Report(machine(), repeats)
    report.runs = [quickstart(workdir / isa, isa) for isa in isas]
    for argv in [["--help"], *([verb, "--help"] for verb in verbs()), ["archs"], ["inspect", CHECKPOINT]]:
        report.startup[" ".join(argv)] = median_and_worst(argv, workdir / isas[0], repeats)
    report.machine["load_after"] = os.getloadavg()
    return report


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def render(report: Report) -> str:
    m = report.machine
    helps = {k: v for k, v in report.startup.items() if k.endswith("--help")}
    worst_help = max(worst for _, worst in helps.values())
    archs = report.startup["archs"]
    loads = [", ".join(f"{x:.2f}" for x in m[key]) for key in ("load_before", "load_after")]  # type: ignore[attr-defined]
    lines = [
        "# The quickstart, measured",
        "",
        "The README's quickstart run as written, each time in a fresh folder, by `make bench-quickstart`",
        "(`python -m bench.quickstart`, which wrote this file). Every command is the installed `headswap`,",
        f"started fresh. `--help`, `archs` and `inspect` ran {report.repeats} times each (median and worst, the",
        "first, cold run included). The two training commands ran with this CPU's own kernels and again with",
        "torch and oneDNN held to AVX2 (`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`), as on a CPU",
        "without AVX-512: slower, and numerically a different run.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (AVX-512: {'yes' if m['avx512'] else 'no'}), Python {m['python']}, "
        f"torch {m['torch']}, torchvision {m['torchvision']}; {m['date']}. Load average (1, 5, 15 min) before "
        f"{loads[0]}, after {loads[1]}: other work on the machine makes times longer, never shorter.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| every `--help` under {HELP_TARGET_S:.0f} s | worst {worst_help:.2f} s | {verdict(worst_help < HELP_TARGET_S)} |",
        f"| `headswap archs` under {ARCHS_TARGET_S:.0f} s | median {archs[0]:.2f} s, worst {archs[1]:.2f} s "
        f"| {verdict(archs[1] < ARCHS_TARGET_S)} |",
    ]
    for r in report.runs:
        lines += [
            f"| `demo-data` + `finetune` under {QUICKSTART_TARGET_S / 60:.0f} min ({ISAS[r.isa][0]}) "
            f"| {r.seconds / 60:.1f} min | {verdict(r.seconds < QUICKSTART_TARGET_S)} |",
            f"| best validation accuracy at least {ACCURACY_TARGET:.2f} ({ISAS[r.isa][0]}) "
            f"| {r.accuracy:.3f} (chance: {CHANCE:.3f}) | {verdict(r.accuracy >= ACCURACY_TARGET)} |",
        ]
    for r in report.runs:
        settings, expected, *progress = r.steps[1].stderr.splitlines()
        lines += [
            "",
            f"## The two commands, {ISAS[r.isa][0]}",
            "",
            "| command | wall time |",
            "|---|---|",
            *[f"| `headswap {' '.join(s.argv)}` | {s.seconds:.1f} s |" for s in r.steps],
            "",
            "What `finetune` printed (its settings with the `auto` values resolved, the time it expected",
            "from its first batches, one line per epoch):",
            "",
            "```",
            settings,
            expected,
            *progress,
            r.steps[1].stdout.strip(),
            "```",
            "",
            f"The checkpoint records its input size ({r.input_size} px: serving resizes to it) and its training "
            f"summary: `{json.dumps(r.training)}`.",
        ]
    lines += [
        "",
        "## Start-up",
        "",
        "| command | median | worst |",
        "|---|---|---|",
        *[f"| `headswap {argv}` | {t[0]:.2f} s | {t[1]:.2f} s |" for argv, t in report.startup.items()],
        "",
        "None of these imports torch or torchvision (`tests/test_cli_startup.py` holds that): `finetune`,",
        "`serve`, `merge`, `slice` and `convert` import them when they run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quickstart.md",
                        help="report to write (default: docs/quickstart.md)")
    parser.add_argument("--workdir", type=Path, help="run in this new folder and keep it (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each --help, archs and inspect (default: 3)")
    parser.add_argument("--isa", nargs="+", choices=sorted(ISAS), default=["native", "avx2"],
                        help="kernels to run the two training commands with (default: native avx2)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        report = measure(args.workdir, args.repeats, args.isa)
    else:
        with tempfile.TemporaryDirectory(prefix="headswap-quickstart-") as tmp:
            report = measure(Path(tmp), args.repeats, args.isa)
    text = render(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
