"""``make bench``: how fast headswap serves, against the ceilings and the peer, in one run on one machine.

Measures, in order: the bare model (the ceiling), decode capacity, headswap end to end at
several concurrencies (with the HTTP-only and do-nothing capacities of its stack), variants
(max batch 1, two workers), a plain LitServe reference, a hot-swap under load, and cold start.
Writes ``bench/results.json``, ``bench/throughput.png`` and ``BENCHMARKS.md``; checks the
targets and says plainly which are missed.

    python -m bench.run [--quick] [--device cpu|cuda] [--arch resnet18] [--out BENCHMARKS.md]
    python -m bench.run --from-json bench/results.json      # re-render BENCHMARKS.md and the plot
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.loadgen import LoadSpec, percentile, process_cpu, summarize
from models import CheckpointMeta, build_classifier, eval_transform, load_classifier, save_checkpoint
from models.demo_data import TASKS, draw_image
from models.transforms import normalize, resize_crop
from service.decode import DecodeLimits, decode_image

ROOT = Path(__file__).resolve().parent.parent
HEADSWAP = str(Path(sys.executable).parent / "headswap")
TOKEN = "bench-admin-token"
NUM_CLASSES = 10


@dataclass(frozen=True)
class Plan:
    """What one run measures and for how long; ``--quick`` shrinks every part of it."""

    mode: str
    device: str
    arch: str
    precision: str
    max_batch_size: int
    workers: int
    concurrencies: tuple[int, ...]
    reference_concurrencies: tuple[int, ...]
    warmup_s: float
    measure_s: float
    bare_batches: tuple[int, ...]
    bare_layouts: tuple[str, ...]
    bare_s: float
    decode_s: float
    swaps: int
    swap_gap_s: float
    swap_concurrency: int
    variants: tuple[tuple[str, dict[str, int]], ...]
    images: int = 32
    max_requests: int = 50_000


def make_plan(args: argparse.Namespace) -> Plan:
    cuda = args.device == "cuda"
    mbs = args.max_batch_size or (32 if cuda else 16)
    quick = args.quick
    return Plan(
        mode="quick" if quick else "full", device=args.device, arch=args.arch or ("resnet50" if cuda else "resnet18"),
        precision="bf16" if cuda else "fp32", max_batch_size=mbs, workers=args.workers,
        concurrencies=(1, 16) if quick else (1, 4, 16, 64), reference_concurrencies=(16,) if quick else (1, 4, 16, 64),
        warmup_s=1.5 if quick else 3.0, measure_s=5.0 if quick else 15.0,
        bare_batches=tuple(sorted({1, mbs} if quick else {1, 8, mbs, 2 * mbs} | ({128} if cuda else set()))),
        bare_layouts=("channels_last",) if quick else ("channels_last", "contiguous"),
        bare_s=2.0 if quick else 4.0, decode_s=2.0 if quick else 4.0,
        swaps=1 if quick else 3, swap_gap_s=6.0 if quick else 10.0, swap_concurrency=16,
        # max batch 1: what batching buys (a GPU target); 2 workers: the other way to use 2 cores.
        variants=(("max batch 1", {"max_batch_size": 1}),) if quick and cuda else () if quick
        else (("max batch 1", {"max_batch_size": 1}), ("2 workers", {"workers": 2})),
        max_requests=100_000 if quick else 300_000,
    )


# --------------------------------------------------------------------------- inputs


def make_checkpoints(store: Path, arch: str, names: list[str]) -> dict[str, str]:
    """Seeded ``arch`` checkpoints with fresh 10-class heads in ``store``; name -> version."""
    store.mkdir(parents=True, exist_ok=True)
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    versions = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = build_classifier(arch, NUM_CLASSES)
        versions[name] = save_checkpoint(store / f"{name}.safetensors", model.state_dict(),
                                         CheckpointMeta.for_arch(arch, classes, name=f"bench-{arch}"))
    return versions


def make_images(folder: Path, count: int) -> list[Path]:
    """``count`` 500x375 JPEGs: the built-in ``shapes`` task, drawn small, upscaled, with sensor-like
    noise of five strengths so that they compress like photos (about 40-90 KB at quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    names = TASKS["shapes"]
    for i in range(count):
        image = draw_image("shapes", names[i % len(names)], size=128, rng=random.Random(f"bench/{i}"))
        image = image.resize((500, 500), Image.BICUBIC).crop((0, 62, 500, 437))
        noise = np.random.default_rng(i).normal(0, 5 + 12 * (i % 5) / 4, (375, 500, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        paths.append(folder / f"{i:03d}.jpg")
        paths[-1].write_bytes(buf.getvalue())
    return paths


def make_json_bodies(images: list[Path], folder: Path) -> list[Path]:
    """The same JPEGs as ``{"image": "<base64>"}``: what plain LitServe's decode_request can take."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in images:
        out.append(folder / f"{path.stem}.json")
        out[-1].write_text(json.dumps({"image": base64.b64encode(path.read_bytes()).decode()}))
    return out


def describe_machine(device: str) -> dict[str, Any]:
    import litserve  # noqa: PLC0415
    import torchvision  # noqa: PLC0415

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "memory_mib": mem, "gpu": gpu, "device_name": gpu or model,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "litserve": litserve.__version__, "load_before": os.getloadavg(),
            "autogroup": _read("/proc/sys/kernel/sched_autogroup_enabled") == "1"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- the ceilings


def bare_model(checkpoint: Path, plan: Plan, threads: int) -> dict[str, Any]:
    """The served checkpoint alone, fed ready-made normalised tensors: images/s per layout and batch."""
    torch.set_num_threads(threads)
    device = torch.device(plan.device)
    model, meta = load_classifier(checkpoint)
    runs = []
    for layout in plan.bare_layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        net = model.to(device, memory_format=fmt)
        for batch in plan.bare_batches:
            x = torch.randn(batch, 3, meta.input_size, meta.input_size, device=device).contiguous(memory_format=fmt)
            times = _time_forward(net, x, plan)
            runs.append({"layout": layout, "batch": batch, "iterations": len(times),
                         "images_per_s": batch * len(times) / sum(times), "ms_per_batch": 1000 * sum(times) / len(times),
                         "median_ms_per_batch": 1000 * float(np.median(times))})
    del model, net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    best = max(runs, key=lambda r: r["images_per_s"])
    served = [r for r in runs if r["layout"] == "channels_last"]
    one = next(r for r in served if r["batch"] == 1)
    at_mbs = next((r for r in served if r["batch"] == plan.max_batch_size), None)
    return {"threads": threads, "runs": runs, "best": best, "batch1_ms": one["ms_per_batch"],
            "at_server_batch": at_mbs}


def _time_forward(net: torch.nn.Module, x: torch.Tensor, plan: Plan) -> list[float]:
    cuda = x.device.type == "cuda"
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if plan.precision == "bf16" else contextlib.nullcontext()
    times: list[float] = []
    with torch.inference_mode(), autocast:
        for _ in range(2 if cuda else 1):  # warm-up
            net(x).float().softmax(-1)
        if cuda:
            torch.cuda.synchronize()
        deadline = time.perf_counter() + plan.bare_s
        while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 1000):
            started = time.perf_counter()
            net(x).float().softmax(-1).cpu()
            times.append(time.perf_counter() - started)
    return times


def decode_capacity(images: list[Path], checkpoint: Path, plan: Plan, threads: int) -> dict[str, Any]:
    """JPEG -> normalised tensor without the model: headswap's path (libjpeg-turbo via torchvision,
    resize, crop, normalise) on one thread and on ``threads``, and the reference's PIL path."""
    _, meta = load_classifier(checkpoint)
    data = [p.read_bytes() for p in images]
    crop, norm, limits = resize_crop(meta), normalize(meta), DecodeLimits()
    pil = eval_transform(meta)

    def server_path(blob: bytes) -> torch.Tensor:
        return norm(crop(decode_image(blob, limits)))

    def pil_path(blob: bytes) -> torch.Tensor:
        return pil(Image.open(io.BytesIO(blob)))

    torch.set_num_threads(1)  # as the API server's decode threads
    out = {"one_thread": _rate(server_path, data, 1, plan.decode_s),
           "capacity": _rate(server_path, data, threads, plan.decode_s),
           "pil_one_thread": _rate(pil_path, data, 1, plan.decode_s)}
    return out


def _rate(fn: Any, data: list[bytes], threads: int, seconds: float) -> dict[str, Any]:
    for blob in data[:2]:
        fn(blob)

    def worker(offset: int, deadline: float) -> int:
        done = 0
        while time.perf_counter() < deadline or done == 0:
            fn(data[(offset + done) % len(data)])
            done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        counts = list(pool.map(worker, range(threads), [started + seconds] * threads))
    wall = time.perf_counter() - started
    return {"threads": threads, "images": sum(counts), "images_per_s": sum(counts) / wall,
            "ms_per_image": 1000 * wall * threads / sum(counts)}


# --------------------------------------------------------------------------- servers and load


@dataclass
class Running:
    port: int
    sid: int
    cold_start_s: float
    log: Path


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], ready_path: str, port: int, log: Path, stop_signal: int, env: dict[str, str] | None = None,
            timeout: float = 300.0) -> Iterator[Running]:
    """Start ``cmd`` in its own session, time process start -> ``ready_path`` 200, end it by pid."""
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent,
                                env={**os.environ, **(env or {})})
    try:
        while not _ok(f"http://127.0.0.1:{port}{ready_path}"):
            if proc.poll() is not None or time.monotonic() - started > timeout:
                raise RuntimeError(f"{cmd[0]} not ready (exit {proc.poll()}); its log ends:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield Running(port, proc.pid, time.monotonic() - started, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in process_cpu(proc.pid):  # leftovers of the server's own session only
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def headswap_cmd(checkpoint: Path, port: int, plan: Plan) -> list[str]:
    return [HEADSWAP, "serve", "--checkpoint", str(checkpoint), "--port", str(port), "--device", plan.device,
            "--precision", plan.precision, "--max-batch-size", str(plan.max_batch_size),
            "--workers-per-device", str(plan.workers), "--log-level", "warning"]


def start_load(spec: LoadSpec, workdir: Path) -> subprocess.Popen:
    spec_file = workdir / f"load-{spec.port}-{spec.concurrency}-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(asdict(spec)))
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_file)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_load(proc: subprocess.Popen, spec: LoadSpec) -> dict[str, Any]:
    out, err = proc.communicate(timeout=spec.warmup_s + spec.measure_s + 2 * spec.timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out)


def sweep(server: Running, spec: LoadSpec, concurrencies: tuple[int, ...], workdir: Path, label: str,
          ok_status: int = 200) -> list[dict[str, Any]]:
    points = []
    for concurrency in concurrencies:
        run = replace(spec, concurrency=concurrency, sid=server.sid)
        point = summarize(finish_load(start_load(run, workdir), run), ok_status)
        points.append(point)
        batch = f"{point['mean_batch']:.1f}" if point["mean_batch"] else "-"
        say(f"  {label} c={concurrency:<3d} {point['rps']:7.1f} req/s  p50 {point['p50_ms']:7.1f} ms  "
            f"p99 {point['p99_ms']:7.1f} ms  batch {batch}  failed {point['failed']}  "
            f"server {point['server_cores']:.2f} / loadgen {point['loadgen_cores']:.2f} cores")
    return points


# --------------------------------------------------------------------------- the hot-swap


def swap_under_load(server: Running, spec: LoadSpec, checkpoints: list[str], plan: Plan, workdir: Path) -> dict[str, Any]:
    """Closed-loop load while the admin API swaps the stable model once per name in ``checkpoints``.

    Steady load for half a gap, then each swap followed by a gap (half a gap after the last);
    the load generator is then told to stop (SIGUSR1), so slow swaps cannot outrun the load.
    """
    bound = plan.swaps * (plan.swap_gap_s + 300)  # the load stops on our signal, long before this
    run = replace(spec, concurrency=plan.swap_concurrency, sid=server.sid, measure_s=bound)
    proc = start_load(run, workdir)
    began = time.monotonic()
    calls = []
    time.sleep(run.warmup_s + 1 + plan.swap_gap_s / 2)
    for i, name in enumerate(checkpoints):
        calls.append(_admin_load(server.port, name))
        say(f"  swap to {name}: {calls[-1]['status']} in {calls[-1]['client_s']:.2f} s (server says {calls[-1]['seconds']} s)")
        time.sleep(plan.swap_gap_s / 2 if i == len(checkpoints) - 1 else plan.swap_gap_s)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGUSR1)
    result = finish_load(proc, run)
    return {**analyse_swaps(result, calls), "seconds": time.monotonic() - began}


def _admin_load(port: int, name: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/load", data=json.dumps({"checkpoint": f"{name}.safetensors"}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, method="POST")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            body, status = json.loads(response.read()), response.status
    except urllib.error.HTTPError as exc:
        body, status = {"error": exc.read().decode(errors="replace")}, exc.code
    ended = time.monotonic()
    return {"checkpoint": name, "status": status, "start": started, "end": ended, "client_s": ended - started,
            "seconds": body.get("seconds"), "versions": body.get("versions"), "error": body.get("error")}


def analyse_swaps(result: dict[str, Any], calls: list[dict[str, Any]], margin_s: float = 1.0) -> dict[str, Any]:
    """p99 of requests in flight within ``margin_s`` of a swap call against the rest of the window."""
    rec = result["records"]
    t0, t1 = result["window"] if len(result["window"]) == 2 else (result["began"], max(rec["end"]))
    windows = [(c["start"] - margin_s, c["end"] + margin_s) for c in calls]
    near, steady = [], []
    for s, e, status in zip(rec["start"], rec["end"], rec["status"]):
        # By overlap, so that a request slowed by a swap is never counted as steady; the steady
        # stretches are several latencies long, so long requests are barely under-sampled there.
        if status == 200 and t0 <= e < t1:
            (near if any(s <= we and e >= ws for ws, we in windows) else steady).append((e - s) * 1000)
    versions = rec["versions"]
    switches = []
    answers = sorted((e, versions[v]) for e, v in zip(rec["end"], rec["version"]) if versions[v])
    for c in calls:
        new = (c.get("versions") or {}).get("stable")
        old = next((v for e, v in reversed(answers) if e < c["start"]), None)  # what was served when the call began
        first_new = next((e for e, v in answers if v == new and e >= c["start"]), None)
        last_old = max((e for e, v in answers if v == old and e >= c["start"]), default=None)
        switches.append({**{k: c[k] for k in ("checkpoint", "status", "seconds", "client_s", "error")},
                         "first_new_after_s": None if first_new is None else first_new - c["start"],
                         "last_old_after_s": None if last_old is None else last_old - c["start"]})
    failed = sum(1 for status in rec["status"] if status != 200)
    return {"concurrency": result["concurrency"], "requests": len(rec["status"]), "failed": failed,
            "errors": result["errors"], "swaps": switches, "margin_s": margin_s,
            "near_requests": len(near), "steady_requests": len(steady),
            "p99_near_ms": percentile(near, 99), "p99_steady_ms": percentile(steady, 99),
            "p50_near_ms": percentile(near, 50), "p50_steady_ms": percentile(steady, 50)}


# --------------------------------------------------------------------------- targets and report


def _best(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(points, key=lambda p: p["rps"]) if points else None


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue with what was measured; ``met`` is None where it cannot be judged,
    ``applies`` is False for the other device's targets (shown for information)."""
    cuda = r["device"] == "cuda"
    hs = r["headswap"]["points"]
    best = _best(hs)
    bare = r["bare"]["best"]["images_per_s"]
    ref = _best(r.get("reference", {}).get("points", []))
    top = hs[-1]
    out = [
        _ratio("headswap req/s ≥ 0.85 × bare model's best images/s", best["rps"], bare, 0.85, not cuda,
               f"{best['rps']:.1f} req/s (c={best['concurrency']}) vs {bare:.1f} images/s"),
        _ratio("headswap req/s ≥ 1.3 × plain LitServe reference", best["rps"], ref["rps"] if ref else None, 1.3, not cuda,
               f"{best['rps']:.1f} vs {ref['rps']:.1f} req/s (c={ref['concurrency']})" if ref else "reference not run"),
        _ratio(f"mean executed batch ≥ 75% of max batch ({r['settings']['max_batch_size']}) at saturation",
               top["mean_batch"] or 0.0, r["settings"]["max_batch_size"], 0.75, not cuda,
               f"{(top['mean_batch'] or 0):.2f} at c={top['concurrency']}"),
    ]
    c1 = next((p for p in hs if p["concurrency"] == 1), None)
    budget = r["bare"]["batch1_ms"] + r["decode"]["one_thread"]["ms_per_image"] + 5
    out.append({"name": "p50 at concurrency 1 ≤ bare batch-1 forward + decode + 5 ms", "applies": not cuda,
                "required": f"≤ {budget:.1f} ms ({r['bare']['batch1_ms']:.1f} + {r['decode']['one_thread']['ms_per_image']:.1f} + 5)",
                "measured": f"{c1['p50_ms']:.1f} ms" if c1 else "not run", "ratio": c1["p50_ms"] / budget if c1 else None,
                "met": (c1["p50_ms"] <= budget) if c1 else None})
    nothing = r["stack"]["do_nothing"]["rps"]
    ceiling = min(bare, r["decode"]["capacity"]["images_per_s"], nothing)
    out.append(_ratio("GPU: end to end ≥ 0.70 × min(bare, decode capacity, do-nothing endpoint)", best["rps"], ceiling, 0.70, cuda,
                      f"{best['rps']:.1f} vs min({bare:.1f}, {r['decode']['capacity']['images_per_s']:.1f}, {nothing:.1f})"))
    one = next((v for v in r.get("variants", []) if v["max_batch_size"] == 1), None)
    same = next((p for p in hs if one and p["concurrency"] == one["points"][0]["concurrency"]), None)
    out.append(_ratio("GPU: batching ≥ 3 × req/s of max batch size 1", same["rps"] if same else 0.0,
                      one["points"][0]["rps"] if one else None, 3.0, cuda,
                      f"{same['rps']:.1f} vs {one['points'][0]['rps']:.1f} req/s at c={same['concurrency']}" if one and same else "not run"))
    sw = r["swap"]
    out.append({"name": "swap: 0 failed requests", "applies": True, "required": "0", "measured": str(sw["failed"]),
                "ratio": None, "met": sw["failed"] == 0 and all(s["status"] == 200 for s in sw["swaps"])})
    out.append(_ratio("swap: p99 around a swap ≤ 2 × steady p99", sw["p99_near_ms"], sw["p99_steady_ms"], 2.0, True,
                      f"{sw['p99_near_ms']:.1f} vs {sw['p99_steady_ms']:.1f} ms", at_most=True))
    return out


def _ratio(name: str, measured: float, reference: float | None, bound: float, applies: bool, detail: str,
           at_most: bool = False) -> dict[str, Any]:
    ratio = measured / reference if reference else None
    met = None if ratio is None or ratio != ratio else (ratio <= bound if at_most else ratio >= bound)
    return {"name": name, "applies": applies, "required": f"{'≤' if at_most else '≥'} {bound:g}×",
            "measured": detail, "ratio": ratio, "met": met}


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def _row(system: str, p: dict[str, Any]) -> str:
    batch = _f(p.get("mean_batch"), 2)
    return (f"| {system} | {p['concurrency']} | {_f(p['rps'])} | {_f(p['p50_ms'])} | {_f(p['p95_ms'])} | {_f(p['p99_ms'])} "
            f"| {batch} | {p['failed']} | {_f(p['server_cores'], 2)} | {_f(p['loadgen_cores'], 2)} | {_f(p.get('other_cores'), 2)} |")


def render(r: dict[str, Any], figure: str) -> str:
    """BENCHMARKS.md from the results."""
    m, s, bare, dec = r["machine"], r["settings"], r["bare"], r["decode"]
    lines = [
        "# headswap benchmarks", "",
        "Generated by `make bench` (`.venv/bin/python -m bench.run`); do not edit by hand. `make bench-quick` "
        "(`--quick`, under 2 minutes) checks the benchmark itself; `--device cuda` measures resnet50 bf16 on a GPU; "
        "`python -m bench.run --from-json bench/results.json` re-renders this page and the plot from the raw results.", "",
        f"**Run:** {r['date']}, {r['mode']} mode, {r['elapsed_s'] / 60:.1f} min.", "",
        "## Machine", "",
        "| | |", "|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |", f"| Memory | {m['memory_mib'] / 1024:.1f} GiB |",
        f"| GPU | {m['gpu'] or 'none'} |",
        f"| Software | Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, litserve {m['litserve']} |",
        f"| Load average before / after | {' '.join(f'{x:.2f}' for x in m['load_before'])} / "
        f"{' '.join(f'{x:.2f}' for x in m.get('load_after', []))} |", "",
        "The *other* column in the tables is the machine's busy cores during the measured window minus the server's "
        "and the load generator's: other tenants of the machine. Where it is well above 0, the numbers are depressed "
        "by work this benchmark does not control."
        + (" Linux autogroup scheduling is on here: CPU time is shared equally between busy sessions, and each server "
           "runs in a session of its own, so with one other busy session a server gets about half of the machine "
           "(server cores ≈ other cores ≈ 1 in the table below)." if m.get("autogroup") else ""), "",
        "## Setup", "",
        f"- Model: {r['arch']}, {NUM_CLASSES} classes (fresh seeded head), {r['precision']}, {r['memory_format']}, "
        f"{s['torch_threads_per_worker']} torch threads per worker (`os.cpu_count() // workers`, as the server).",
        f"- headswap: `headswap serve --max-batch-size {s['max_batch_size']} --workers-per-device {s['workers_per_device']}` "
        f"(batch timeout {s['batch_timeout_ms']:g} ms, {s['decode_threads']} decode threads: the defaults).",
        f"- Requests: {r['images']['count']} JPEGs, {r['images']['size']}, {r['images']['kb_min']:.0f}–{r['images']['kb_max']:.0f} KB "
        f"(mean {r['images']['kb_mean']:.0f} KB), drawn from the built-in `shapes` task with photo-like noise; "
        "headswap gets raw `image/jpeg` bodies on `/predict`.",
        "- Plain LitServe reference (`bench/reference_server.py`): LitServe's defaults (1 worker, max batch size 1), "
        "PIL decode + `eval_transform` in `decode_request`, same checkpoint. LitServe hands `decode_request` only "
        "`request.json()`, so **the reference receives the same JPEG base64-encoded in JSON** `{\"image\": ...}` "
        "(33% more bytes and a base64 decode).",
        "- Load (`bench/loadgen.py`): closed loop, one keep-alive HTTP/1.1 connection per virtual user, over 127.0.0.1, "
        f"in its own process ({r['plan']['warmup_s']:g} s warm-up, {r['plan']['measure_s']:g} s measured per point). "
        "Its CPU use is reported: on a small machine it competes with the server.", "",
        "## Results", "",
        "| System | Concurrency | Requests/s | p50 ms | p95 ms | p99 ms | Mean batch | Failed | Server cores | Loadgen cores | Other cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row("headswap", p) for p in r["headswap"]["points"]]
    for v in r.get("variants", []):
        lines += [_row(f"headswap, {v['name']}", p) for p in v["points"]]
    lines += [_row("plain LitServe (JSON base64)", p) for p in r.get("reference", {}).get("points", [])]
    lines += [_row("headswap GET /health (HTTP only)", r["stack"]["health"]),
              _row("headswap do-nothing (HTTP + queue + worker, no decode/forward)", r["stack"]["do_nothing"])]
    lines += ["", "Mean batch: images per executed forward pass, from the server's `headswap_batch_size` histogram over the "
              "window. Requests/s counts answers with the expected status (200; 400 for do-nothing, which the worker "
              "refuses without a forward pass).", "",
              f"![throughput and latency]({figure})", "",
              f"### Ceilings", "",
              f"Bare model ({bare['threads']} threads, ready-made normalised tensors, `torch.inference_mode`):", "",
              "| Layout | Batch | Images/s | ms per batch | median ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {b['layout']} | {b['batch']} | {_f(b['images_per_s'])} | {_f(b['ms_per_batch'])} | {_f(b['median_ms_per_batch'])} |"
              for b in bare["runs"]]
    lines += ["", "Decode (JPEG bytes to normalised tensor, no model):", "",
              "| Path | Threads | Images/s | ms per image (per thread) |", "|---|---:|---:|---:|",
              f"| headswap (torchvision decode_jpeg, resize, crop, normalise) | 1 | {_f(dec['one_thread']['images_per_s'])} | {_f(dec['one_thread']['ms_per_image'])} |",
              f"| headswap, capacity | {dec['capacity']['threads']} | {_f(dec['capacity']['images_per_s'])} | {_f(dec['capacity']['ms_per_image'])} |",
              f"| reference (PIL open + eval_transform) | 1 | {_f(dec['pil_one_thread']['images_per_s'])} | {_f(dec['pil_one_thread']['ms_per_image'])} |",
              "", "## Targets", "", "| Target | Required | Measured | Ratio | Verdict |", "|---|---|---|---:|---|"]
    for t in targets(r):
        verdict = ("n/a (other device)" if not t["applies"] else "not judged" if t["met"] is None
                   else "**met**" if t["met"] else "**MISSED**")
        lines.append(f"| {t['name']} | {t['required']} | {t['measured']} | {_f(t['ratio'], 2)} | {verdict} |")
    missed = [t["name"] for t in targets(r) if t["applies"] and t["met"] is False]
    lines += ["", f"**{len(missed)} target(s) missed:** " + "; ".join(missed) + "." if missed else "**All targets met.**", ""]
    lines += _swap_section(r["swap"], next((p for p in r["headswap"]["points"] if p["concurrency"] == r["swap"]["concurrency"]), None))
    top = r["headswap"]["points"][-1]
    roles = ", ".join(f"{role} {cores:.2f}" for role, cores in top["server_cores_by_role"].items())
    lines += ["## Cold start", "",
              f"Process start to `/ready` 200: headswap {r['headswap']['cold_start_s']:.1f} s"
              + "".join(f", {v['name']} {v['cold_start_s']:.1f} s" for v in r.get("variants", []))
              + (f"; plain LitServe to `/health` 200: {r['reference']['cold_start_s']:.1f} s." if r.get("reference") else "."), "",
              "## Where the CPU goes at saturation", "",
              f"headswap at concurrency {top['concurrency']}: server {top['server_cores']:.2f} cores ({roles}), "
              f"load generator {top['loadgen_cores']:.2f}, other tenants {_f(top.get('other_cores'), 2)}, "
              f"of {m['cores']}. Roles: *worker* runs the forward pass; *api* is the uvicorn process (HTTP, decode threads); "
              "*manager* is LitServe's multiprocessing manager that carries the request/response queues; *main* is the "
              "parent process.", "",
              "Server CPU per answered request (core-milliseconds): " + ", ".join(
                  f"{label} {1000 * p['server_cores'] / p['rps']:.1f}" + (
                      f" (worker {1000 * p['server_cores_by_role'].get('worker', 0) / p['rps']:.1f}, "
                      f"api {1000 * p['server_cores_by_role'].get('api', 0) / p['rps']:.1f}, "
                      f"manager {1000 * p['server_cores_by_role'].get('manager', 0) / p['rps']:.1f})")
                  for label, p in (("headswap at saturation", top), ("do-nothing", r["stack"]["do_nothing"]),
                                   ("GET /health", r["stack"]["health"])) if p["rps"]) + ".", ""]
    return "\n".join(lines)


def _swap_section(sw: dict[str, Any], sweep_point: dict[str, Any] | None) -> list[str]:
    lines = ["## Swap under load", "",
             f"Closed loop at concurrency {sw['concurrency']}, {sw['requests']} requests, {len(sw['swaps'])} swap(s) through "
             "`POST /admin/load`; *around* a swap means requests in flight from "
             f"{sw['margin_s']:g} s before the admin call to {sw['margin_s']:g} s after it returned.", "",
             "| Checkpoint | Status | Admin call to all workers switched | server's own count (`seconds`) "
             "| First new-version answer | Last old-version answer |",
             "|---|---:|---:|---:|---:|---:|"]
    for x in sw["swaps"]:
        lines.append(f"| {x['checkpoint']} | {x['status']} | {_f(x['client_s'], 2)} s | {_f(x['seconds'], 2)} s "
                     f"| {_f(x['first_new_after_s'], 2)} s | {_f(x['last_old_after_s'], 2)} s |")
    lines += ["", "The admin call returns once every worker has switched, so its wall time is the swap time; the response's "
              "`seconds` is the server's own count of the same span (validation, publishing, every worker's "
              "acknowledgement) without the HTTP round trip. Answer times are from the admin call's start."]
    errors = f" ({', '.join(f'{k}: {v}' for k, v in sw['errors'].items())})" if sw["errors"] else ""
    lines += ["", f"Failed requests: **{sw['failed']}**{errors}. p50/p99 around swaps "
              f"{_f(sw['p50_near_ms'])}/{_f(sw['p99_near_ms'])} ms ({sw['near_requests']} requests) against steady "
              f"{_f(sw['p50_steady_ms'])}/{_f(sw['p99_steady_ms'])} ms ({sw['steady_requests']} requests) in the same run"
              + (f"; the sweep's p50/p99 at this concurrency was {_f(sweep_point['p50_ms'])}/{_f(sweep_point['p99_ms'])} ms."
                 if sweep_point else "."), ""]
    return lines


# --------------------------------------------------------------------------- the run


def say(line: str) -> None:
    print(line, flush=True)


def measure(plan: Plan, work: Path) -> dict[str, Any]:
    """Every stage of one run, in order, on this machine; returns the results as JSON-able data."""
    started = time.monotonic()
    threads = max(1, (os.cpu_count() or 1) // plan.workers)  # the server's own budget per worker
    results: dict[str, Any] = {
        "version": 1, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "mode": plan.mode, "device": plan.device,
        "arch": plan.arch, "precision": plan.precision, "memory_format": "channels_last",
        "machine": describe_machine(plan.device), "plan": asdict(plan),
        "settings": {"max_batch_size": plan.max_batch_size, "workers_per_device": plan.workers, "batch_timeout_ms": 2.0,
                     "decode_threads": 4, "torch_threads_per_worker": threads}}
    swap_names = [f"swap{i + 1}" for i in range(plan.swaps)]
    say(f"checkpoints: {plan.arch}, {NUM_CLASSES} classes (base + {', '.join(swap_names)})")
    versions = make_checkpoints(work / "store", plan.arch, ["base", *swap_names])
    base = work / "store" / "base.safetensors"
    images = make_images(work / "images", plan.images)
    sizes = [p.stat().st_size / 1024 for p in images]
    results["images"] = {"count": len(images), "size": "500x375", "kb_min": min(sizes), "kb_max": max(sizes),
                         "kb_mean": sum(sizes) / len(sizes), "versions": versions}

    say(f"bare model: {plan.arch} {plan.precision}, {threads} threads, batches {plan.bare_batches}")
    results["bare"] = bare_model(base, plan, threads)
    for r in results["bare"]["runs"]:
        say(f"  {r['layout']:<13} batch {r['batch']:<3d} {r['images_per_s']:7.1f} images/s  {r['ms_per_batch']:7.1f} ms/batch")
    results["decode"] = decode_capacity(images, base, plan, min(os.cpu_count() or 1, 4 * plan.workers))
    torch.set_num_threads(threads)
    for name, r in results["decode"].items():
        say(f"  decode {name:<15} {r['images_per_s']:7.1f} images/s ({r['threads']} threads, {r['ms_per_image']:.1f} ms/image)")

    jpeg = LoadSpec(port=0, path="/predict", bodies=[str(p) for p in images], content_type="image/jpeg", concurrency=1,
                    warmup_s=plan.warmup_s, measure_s=plan.measure_s, max_requests=plan.max_requests, metrics_path="/metrics")
    results.update(headswap_stage(plan, base, jpeg, swap_names, work))
    results["variants"] = [variant_stage(plan, name, change, base, jpeg, work) for name, change in plan.variants]
    results["reference"] = reference_stage(plan, base, replace(jpeg, bodies=[str(p) for p in make_json_bodies(images, work / "json")],
                                                               content_type="application/json", metrics_path=""), work)
    results["machine"]["load_after"] = os.getloadavg()
    results["elapsed_s"] = time.monotonic() - started
    return results


def headswap_stage(plan: Plan, base: Path, jpeg: LoadSpec, swap_names: list[str], work: Path) -> dict[str, Any]:
    """One server: cold start, the concurrency sweep, the stack's own capacity, then the swaps."""
    port = free_port()
    say(f"headswap: max batch {plan.max_batch_size}, {plan.workers} worker(s)")
    with running(headswap_cmd(base, port, plan), "/ready", port, work / "headswap.log", signal.SIGTERM,
                 env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        say(f"  cold start {server.cold_start_s:.1f} s")
        spec = replace(jpeg, port=port)
        points = sweep(server, spec, plan.concurrencies, work, "headswap")
        seconds = 3.0 if plan.mode == "quick" else 8.0
        health = LoadSpec(port=port, path="/health", bodies=[], content_type="", method="GET", concurrency=plan.concurrencies[-1],
                          warmup_s=1.0, measure_s=seconds, max_requests=plan.max_requests)
        nothing = _do_nothing_spec(work, port, f"bench-{plan.arch}", plan, seconds)
        stack = {"health": sweep(server, health, (health.concurrency,), work, "GET /health")[0],
                 "do_nothing": sweep(server, nothing, (nothing.concurrency,), work, "do-nothing", ok_status=400)[0]}
        say(f"swap under load: concurrency {plan.swap_concurrency}, {plan.swaps} swap(s)")
        swap = swap_under_load(server, spec, swap_names, plan, work)
    return {"headswap": {"cold_start_s": server.cold_start_s, "points": points}, "stack": stack, "swap": swap}


def variant_stage(plan: Plan, name: str, change: dict[str, int], base: Path, jpeg: LoadSpec, work: Path) -> dict[str, Any]:
    """The same load at the highest concurrency against the server with other settings."""
    variant = replace(plan, **change)
    port = free_port()
    say(f"headswap variant {name}")
    with running(headswap_cmd(base, port, variant), "/ready", port, work / f"variant-{port}.log", signal.SIGTERM) as server:
        points = sweep(server, replace(jpeg, port=port), (plan.concurrencies[-1],), work, name)
    return {"name": name, "max_batch_size": variant.max_batch_size, "workers": variant.workers,
            "cold_start_s": server.cold_start_s, "points": points}


def reference_stage(plan: Plan, base: Path, spec: LoadSpec, work: Path) -> dict[str, Any]:
    port = free_port()
    say("plain LitServe reference (JSON base64 body, PIL decode in decode_request, LitServe defaults)")
    cmd = [sys.executable, "-m", "bench.reference_server", "--checkpoint", str(base), "--port", str(port)]
    # LitServe 0.2.19 has no SIGTERM handler: its main process dies at once and ``running`` ends
    # the rest of its session. Nothing is measured by then.
    with running(cmd, "/health", port, work / "reference.log", signal.SIGTERM, env={"PYTHONPATH": str(ROOT)}) as server:
        say(f"  cold start {server.cold_start_s:.1f} s")
        points = sweep(server, replace(spec, port=port), plan.reference_concurrencies, work, "reference")
    return {"cold_start_s": server.cold_start_s, "points": points}


def _do_nothing_spec(work: Path, port: int, model: str, plan: Plan, seconds: float) -> LoadSpec:
    """A V2 request whose 1x1 PIXELS the worker refuses (400) without running the model: HTTP,
    parsing, the queue to the worker and back, and no decode or forward pass."""
    body = work / "do-nothing.json"
    body.write_text(json.dumps({"inputs": [{"name": "PIXELS", "shape": [1, 3, 1, 1], "datatype": "FP32", "data": [0.0, 0.0, 0.0]}]}))
    return LoadSpec(port=port, path=f"/v2/models/{model}/infer", bodies=[str(body)], content_type="application/json",
                    concurrency=plan.concurrencies[-1], warmup_s=1.0, measure_s=seconds, max_requests=plan.max_requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description="headswap's benchmark (make bench)")
    parser.add_argument("--quick", action="store_true", help="short check (< 2 min): concurrency 1 and 16, short windows")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arch", default="", help="default: resnet18 on cpu, resnet50 on cuda")
    parser.add_argument("--max-batch-size", type=int, default=0, help="server max batch size (default 16 cpu, 32 cuda)")
    parser.add_argument("--workers", type=int, default=1, help="server workers per device")
    parser.add_argument("--out", default="", help="report (default BENCHMARKS.md; build/bench-quick/ for --quick)")
    parser.add_argument("--results", default="", help="raw results (default bench/results.json)")
    parser.add_argument("--plot", default="", help="figure (default bench/throughput.png)")
    parser.add_argument("--from-json", default="", help="re-render the report and plot from a results file; measure nothing")
    args = parser.parse_args(argv)
    # A quick check must not overwrite the committed full results.
    home = ROOT / "build" / "bench-quick" if args.quick else ROOT
    args.out = args.out or str(home / "BENCHMARKS.md")
    args.results = args.results or str(home / "bench" / "results.json")
    args.plot = args.plot or str(home / "bench" / "throughput.png")
    try:
        import matplotlib  # noqa: F401, PLC0415 - checked before minutes of measuring, used at the end
    except ImportError:
        parser.error("matplotlib is missing: pip install -e '.[bench]'")
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        with tempfile.TemporaryDirectory(prefix="headswap-bench-") as tmp:
            results = measure(make_plan(args), Path(tmp))
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=1))
    from bench.plot import plot  # noqa: PLC0415 - matplotlib is only needed here

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = plot(results, Path(args.plot))
    out.write_text(render(results, os.path.relpath(figure, out.parent)))
    say(f"wrote {out}, {figure}" + ("" if args.from_json else f", {args.results}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
