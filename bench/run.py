"""``make bench``: how fast headswap serves, against the ceilings and the peers, in one run on one machine.

Measures, in order: the bare model (the ceiling), decode capacity, headswap with its defaults end
to end at several concurrencies (with the HTTP-only and do-nothing capacities of its stack), a
hot-swap under load, overload (open-loop arrivals at 1x, 2x, 4x the saturation rate, with
shedding on and, beside it, off), V2 over gRPC beside HTTP (and each one's do-nothing capacity),
labelled variants (other layouts), a plain LitServe reference, a lone client against headswap,
that reference and TorchServe in alternating windows, and cold start.
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
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import torchserve_peer
from bench.loadgen import LoadSpec, finish_load, percentile, process_cpu, start_load, summarize
from bench.overload import has_max_queue, open_loop_points
from bench.report import render
from models import CheckpointMeta, build_classifier, eval_transform, load_classifier, save_checkpoint
from models.demo_data import TASKS, draw_image
from models.transforms import normalize, resize_crop
from service.inference.decode import DecodeLimits, decode_image
from service.protocols.grpc_v2 import open_inference_pb2
from service.protocols.v2_tensors import pack_bytes
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
HEADSWAP = str(Path(sys.executable).parent / "headswap")
TOKEN = "bench-admin-token"
NUM_CLASSES = 10
DEFAULTS = Settings()  # the server's defaults: the bench passes only what differs from them


@dataclass(frozen=True)
class Plan:
    """What one run measures and for how long; ``--quick`` shrinks every part of it."""

    mode: str
    device: str
    arch: str
    precision: str
    max_batch_size: int
    workers: int  # workers per device; 0: the server's own choice
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
    variants: tuple[tuple[str, dict[str, int], tuple[int, ...]], ...]  # label, Plan changes, concurrencies
    overload_factors: tuple[float, ...] = (1.0, 2.0, 4.0)
    overload_warmup_s: float = 2.0
    overload_s: float = 20.0
    overload_drain_s: float = 35.0  # the server's --timeout-s (30 s) and a margin: every admitted request is answered by then
    overload_capacity_s: float = 10.0  # each closed-loop window around an overload point (the server's capacity then)
    lone_rounds: int = 4  # concurrency 1: alternating windows of headswap and plain LitServe ...
    lone_s: float = 6.0  # ... this long each
    # HTTP against gRPC at saturation: each window this long. Answers come in batches of max batch
    # size, so a window counts them in steps of a batch (15 s at 42 req/s: steps of 2.5%); the
    # target is 1.0x, so each window must resolve well under that.
    grpc_s: float = 45.0
    images: int = 32
    max_requests: int = 50_000
    decode_on: str = "api"
    api_servers: int = 0  # the server's --api-servers; 0: its default (one per worker)


def make_plan(args: argparse.Namespace) -> Plan:
    cuda = args.device == "cuda"
    mbs = args.max_batch_size or DEFAULTS.max_batch_size
    quick = args.quick
    top = 16 if quick else 64
    # max batch 1: what batching buys (a GPU target); one worker per device: on CPU, the layout
    # the benchmark used before it measured the defaults (one worker, every core's threads).
    variants: tuple[tuple[str, dict[str, int], tuple[int, ...]], ...] = (("max batch 1", {"max_batch_size": 1}, (top,)),)
    if not cuda:
        variants += (("--workers-per-device 1", {"workers": 1}, (1, top)),)
    return Plan(
        mode="quick" if quick else "full", device=args.device, arch=args.arch or ("resnet50" if cuda else "resnet18"),
        precision="bf16" if cuda else "fp32", max_batch_size=mbs, workers=args.workers,
        concurrencies=(1, top) if quick else (1, 4, 16, top), reference_concurrencies=(1, top) if quick else (1, 4, 16, top),
        warmup_s=1.5 if quick else 3.0, measure_s=5.0 if quick else 15.0,
        bare_batches=tuple(sorted({1, mbs} if quick else {1, 8, mbs, 2 * mbs} | ({128} if cuda else set()))),
        bare_layouts=("channels_last",) if quick else ("channels_last", "contiguous"),
        bare_s=2.0 if quick else 4.0, decode_s=2.0 if quick else 4.0,
        swaps=1 if quick else 3, swap_gap_s=6.0 if quick else 10.0, swap_concurrency=16,
        variants=variants[:1] if quick and cuda else () if quick else variants,
        overload_warmup_s=1.0 if quick else 2.0, overload_s=4.0 if quick else 20.0, overload_capacity_s=3.0 if quick else 10.0,
        lone_rounds=1 if quick else 4, lone_s=3.0 if quick else 6.0, grpc_s=5.0 if quick else 45.0,
        max_requests=100_000 if quick else 300_000, decode_on=args.decode_on, api_servers=args.api_servers,
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


LONE_GAP_S = 0.015  # about what a lone client's request spends outside the forward (decode, HTTP, queues)


def lone_forward(checkpoint: Path, plan: Plan, threads: int) -> Callable[[], tuple[float, float]]:
    """A probe of the bare batch-1 forward (``threads`` threads, channels_last): each call measures it
    for ``plan.bare_s`` back to back, then for as long again with the machine idle ``LONE_GAP_S``
    before each forward, as a lone client's requests leave it, and returns both means in ms. Used
    before each window of the lone-client stage, so that its bound and the windows share each minute
    of this machine's drifting speed. The bound uses the back-to-back forward; the paced one shows
    what idling between requests costs the forward on this machine (caches, a virtual CPU's wake-up)."""
    model, meta = load_classifier(checkpoint)
    net = model.to(torch.device(plan.device), memory_format=torch.channels_last)
    x = torch.randn(1, 3, meta.input_size, meta.input_size, device=plan.device).contiguous(memory_format=torch.channels_last)

    def probe() -> tuple[float, float]:
        torch.set_num_threads(threads)
        times, paced = _time_forward(net, x, plan), _time_forward(net, x, plan, gap_s=LONE_GAP_S)
        return 1000 * sum(times) / len(times), 1000 * sum(paced) / len(paced)

    return probe


def _time_forward(net: torch.nn.Module, x: torch.Tensor, plan: Plan, gap_s: float = 0.0) -> list[float]:
    """Forward times in seconds, for ``plan.bare_s``; ``gap_s``: idle this long before each one."""
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
            if gap_s:
                time.sleep(gap_s)
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
            timeout: float = 300.0, ready_body: bytes | None = None, content_type: str = "") -> Iterator[Running]:
    """Start ``cmd`` in its own session, time process start -> ``ready_path`` 200 (a GET, or a POST
    of ``ready_body``), end it by pid."""
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent,
                                env={**os.environ, **(env or {})})
    try:
        while not _ok(f"http://127.0.0.1:{port}{ready_path}", ready_body, content_type):
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


def _ok(url: str, body: bytes | None = None, content_type: str = "") -> bool:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=2 if body is None else 60) as response:
            return response.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def server_flags(plan: Plan) -> list[str]:
    """The options of ``headswap serve`` that ``plan`` needs beyond checkpoint and port: only those
    that differ from the server's defaults, so that a plain plan measures the defaults."""
    flags = []
    if plan.device != ("cuda" if torch.cuda.is_available() else "cpu"):  # what --device auto picks
        flags += ["--device", plan.device]
    if plan.max_batch_size != DEFAULTS.max_batch_size:
        flags += ["--max-batch-size", str(plan.max_batch_size)]
    if plan.workers:
        flags += ["--workers-per-device", str(plan.workers)]
    if plan.decode_on != DEFAULTS.decode_on:
        flags += ["--decode-on", plan.decode_on]
    if plan.api_servers:
        flags += ["--api-servers", str(plan.api_servers)]
    return flags  # precision: auto is the plan's (bf16 on CUDA, fp32 on CPU)


def headswap_cmd(checkpoint: Path, port: int, plan: Plan, extra: tuple[str, ...] = ()) -> list[str]:
    return [HEADSWAP, "serve", "--checkpoint", str(checkpoint), "--port", str(port), *server_flags(plan), *extra]


READY = re.compile(r"worker (\S+) \(pid \d+\) ready: (.*?)(?:, model .*)?$")


def served_layout(log: Path) -> dict[str, Any]:
    """The layout the server chose, from its workers' start-up lines (``worker W (pid P) ready: device
    D, precision P, N threads, model ...``): how many, and what each said."""
    said = [m.group(2) for line in log.read_text(errors="replace").splitlines() if (m := READY.search(line))]
    return {"workers": len(said), "each": sorted(set(said))}


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


# --------------------------------------------------------------------------- the run


def say(line: str) -> None:
    print(line, flush=True)


def measure(plan: Plan, work: Path) -> dict[str, Any]:
    """Every stage of one run, in order, on this machine; returns the results as JSON-able data."""
    started = time.monotonic()
    threads = os.cpu_count() or 1  # the bare model gets every core: the ceiling a lone request could reach
    results: dict[str, Any] = {
        "version": 2, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "mode": plan.mode, "device": plan.device,
        "arch": plan.arch, "num_classes": NUM_CLASSES, "precision": plan.precision, "memory_format": "channels_last",
        "machine": describe_machine(plan.device), "plan": asdict(plan),
        "settings": {"flags": server_flags(plan), "max_batch_size": plan.max_batch_size, "workers_per_device": plan.workers,
                     "batch_timeout_ms": DEFAULTS.batch_timeout_ms, "decode_threads": DEFAULTS.decode_threads,
                     "bare_threads": threads, "decode_on": plan.decode_on}}
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
    results["decode"] = decode_capacity(images, base, plan, min(threads, DEFAULTS.decode_threads))
    torch.set_num_threads(threads)
    for name, r in results["decode"].items():
        say(f"  decode {name:<15} {r['images_per_s']:7.1f} images/s ({r['threads']} threads, {r['ms_per_image']:.1f} ms/image)")

    jpeg = LoadSpec(port=0, path="/predict", bodies=[str(p) for p in images], content_type="image/jpeg", concurrency=1,
                    warmup_s=plan.warmup_s, measure_s=plan.measure_s, max_requests=plan.max_requests, metrics_path="/metrics")
    reference = replace(jpeg, bodies=[str(p) for p in make_json_bodies(images, work / "json")], content_type="application/json",
                        metrics_path="")
    results.update(headswap_stage(plan, base, jpeg, swap_names, work))
    if plan.device == "cpu":
        results["lone"] = lone_client_stage(plan, base, jpeg, reference, work)
    results["overload"]["systems"].append(unbounded_stage(plan, base, jpeg, results["overload"], work))
    results["grpc"] = grpc_stage(plan, base, jpeg, work)
    results["variants"] = [variant_stage(plan, name, change, levels, base, jpeg, work) for name, change, levels in plan.variants]
    results["reference"] = reference_stage(plan, base, reference, work)
    results["machine"]["load_after"] = os.getloadavg()
    results["elapsed_s"] = time.monotonic() - started
    return results


def headswap_stage(plan: Plan, base: Path, jpeg: LoadSpec, swap_names: list[str], work: Path) -> dict[str, Any]:
    """One server with its defaults: cold start, the concurrency sweep, the stack's own capacity,
    the swaps, then the overload points at multiples of the sweep's best requests/s."""
    port = free_port()
    say(f"headswap (defaults){': ' + ' '.join(server_flags(plan)) if server_flags(plan) else ''}")
    with running(headswap_cmd(base, port, plan), "/ready", port, work / "headswap.log", signal.SIGTERM,
                 env={"HEADSWAP_ADMIN_TOKEN": TOKEN}) as server:
        layout = served_layout(server.log)
        say(f"  cold start {server.cold_start_s:.1f} s; {layout['workers']} worker(s): {'; '.join(layout['each'])}")
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
        best = max(points, key=lambda p: p["rps"])
        shedding = has_max_queue(HEADSWAP)
        say(f"overload: open loop at {', '.join(f'{f:g}x' for f in plan.overload_factors)} of {best['rps']:.1f} req/s "
            f"(c={best['concurrency']}), {plan.overload_s:g} s each" + ("" if shedding else "; this server has no --max-queue"))
        overload = {"saturation_rps": best["rps"], "saturation_concurrency": best["concurrency"], "shedding": shedding,
                    "systems": [overload_points("headswap (defaults)", server_flags(plan), server, spec, best["rps"], plan, work,
                                                best["concurrency"])]}
    return {"headswap": {"cold_start_s": server.cold_start_s, "points": points, "layout": layout}, "stack": stack,
            "swap": swap, "overload": overload}


def lone_client_stage(plan: Plan, base: Path, jpeg: LoadSpec, reference: LoadSpec, work: Path) -> dict[str, Any]:
    """Concurrency 1: headswap (defaults) and its peers, the plain LitServe reference and (where it
    can run) TorchServe, all started, in alternating windows (the others stopped with SIGSTOP, so
    their idle threads cost nothing), the bare batch-1 forward measured before each window with all
    of them stopped. They share every minute of this machine's drifting speed, which the sweep's
    c=1 point and the reference stage, minutes apart, do not."""
    skipped = torchserve_peer.unavailable()
    say(f"lone client: headswap (defaults), plain LitServe{'' if skipped else ' and TorchServe'} at c=1, "
        f"{plan.lone_rounds} alternating rounds, the bare batch-1 forward before each window"
        + (f" (TorchServe not run: {skipped})" if skipped else ""))
    probe = lone_forward(base, plan, os.cpu_count() or 1)
    hs_port, ref_port, ts_port = free_port(), free_port(), free_port()
    windows: list[dict[str, Any]] = []
    with running(headswap_cmd(base, hs_port, plan), "/ready", hs_port, work / "lone-headswap.log", signal.SIGTERM) as hs, \
         running_reference(base, ref_port, work / "lone-reference.log") as ref, \
         (contextlib.nullcontext() if skipped else running_torchserve(base, ts_port, jpeg, work)) as ts:
        servers = {"headswap": (hs, replace(jpeg, port=hs_port)), "reference": (ref, replace(reference, port=ref_port))}
        if ts is not None:
            servers["torchserve"] = (ts, replace(jpeg, port=ts_port, path=f"/predictions/{torchserve_peer.MODEL}"))
        stopped = _Stopped([server.sid for server, _ in servers.values()])
        with stopped:
            for _ in range(plan.lone_rounds):
                for name, (server, spec) in servers.items():
                    bare_ms, paced_ms = probe()
                    say(f"  bare batch-1 forward {bare_ms:.1f} ms ({paced_ms:.1f} ms paced), then")
                    with stopped.resumed(server.sid):
                        point = sweep(server, replace(spec, warmup_s=1.5, measure_s=plan.lone_s), (1,), work, name)[0]
                    windows.append({"system": name, "bare_ms": bare_ms, "paced_ms": paced_ms, "point": point})
    summary = {name: statistics.mean(w["point"]["p50_ms"] for w in windows if w["system"] == name) for name in servers}
    bare, paced = statistics.mean(w["bare_ms"] for w in windows), statistics.mean(w["paced_ms"] for w in windows)
    say(f"  mean of the windows' p50: {', '.join(f'{name} {p50:.1f} ms' for name, p50 in summary.items())}; "
        f"bare batch-1 forward {bare:.1f} ms ({paced:.1f} ms paced)")
    return {"windows": windows, "p50_ms": summary, "bare_ms": bare, "paced_ms": paced, "gap_ms": 1000 * LONE_GAP_S,
            "seconds": plan.lone_s, **({"torchserve_skipped": skipped} if skipped else {})}


class _Stopped:
    """Every server of ``sids`` stopped (SIGSTOP to its session) inside the block, but one at a time
    while it is measured (``resumed``); every one continues at the end, whatever happened."""

    def __init__(self, sids: list[int]) -> None:
        self.sids = sids

    def __enter__(self) -> _Stopped:
        for sid in self.sids:
            os.killpg(sid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        for sid in self.sids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGCONT)

    @contextlib.contextmanager
    def resumed(self, sid: int) -> Iterator[None]:
        os.killpg(sid, signal.SIGCONT)
        time.sleep(0.5)  # its timers and pollers catch up before the warm-up
        try:
            yield
        finally:
            os.killpg(sid, signal.SIGSTOP)


def unbounded_stage(plan: Plan, base: Path, jpeg: LoadSpec, overload: dict[str, Any], work: Path) -> dict[str, Any]:
    """The same open-loop points against a server started with ``--max-queue 0`` (no shedding);
    skipped, and said so, when the server has no ``--max-queue``."""
    name = "headswap, --max-queue 0 (unbounded)"
    if not overload["shedding"]:
        return {"name": name, "flags": [], "points": [], "skipped": "this server has no --max-queue"}
    port = free_port()
    say(name)
    extra = ("--max-queue", "0")
    with running(headswap_cmd(base, port, plan, extra), "/ready", port, work / "unbounded.log", signal.SIGTERM) as server:
        say(f"  cold start {server.cold_start_s:.1f} s")
        system = overload_points(name, [*server_flags(plan), *extra], server, replace(jpeg, port=port),
                                 overload["saturation_rps"], plan, work)
    return {**system, "cold_start_s": server.cold_start_s}


def overload_points(name: str, flags: list[str], server: Running, spec: LoadSpec, saturation: float, plan: Plan,
                    work: Path, concurrency: int = 0) -> dict[str, Any]:
    """The plan's open-loop points (multiples of ``saturation`` req/s) against ``server``; with a
    ``concurrency``, each point between closed-loop windows at it (the server's capacity then)."""
    probe = replace(spec, warmup_s=plan.warmup_s, measure_s=plan.overload_capacity_s)

    def capacity() -> float:
        return sweep(server, probe, (concurrency,), work, "capacity")[0]["rps"]

    points = open_loop_points(server.port, server.sid, spec, saturation, plan.overload_factors, plan.overload_warmup_s,
                              plan.overload_s, plan.overload_drain_s, name.split(", ")[-1], work, say,
                              capacity if concurrency else None)
    return {"name": name, "flags": flags, "points": points}


def grpc_stage(plan: Plan, base: Path, jpeg: LoadSpec, work: Path) -> dict[str, Any]:
    """The defaults plus ``--grpc-port``: HTTP raw JPEG bodies and V2 gRPC (IMAGE as raw BYTES, as
    tritonclient.grpc sends it) at the same concurrency, in windows ordered HTTP, gRPC, gRPC, HTTP
    (one of each with --quick), then each protocol's do-nothing capacity, all against one server in
    one run."""
    port, grpc_port = free_port(), free_port()
    extra = ("--grpc-port", str(grpc_port))
    model = f"bench-{plan.arch}"
    say(f"headswap, HTTP and gRPC: {' '.join([*server_flags(plan), *extra])}")
    folder = work / "grpc"
    folder.mkdir(exist_ok=True)
    infer = [_grpc_body(folder / f"{i}.bin", model, "IMAGE", "BYTES", [1], pack_bytes([Path(p).read_bytes()]))
             for i, p in enumerate(jpeg.bodies)]
    nothing = _grpc_body(folder / "nothing.bin", model, "PIXELS", "FP32", [1, 3, 1, 1], bytes(12))
    top = plan.concurrencies[-1]
    seconds = 3.0 if plan.mode == "quick" else 8.0
    with running(headswap_cmd(base, port, plan, extra), "/ready", port, work / "grpc.log", signal.SIGTERM) as server:
        say(f"  cold start {server.cold_start_s:.1f} s")
        http_spec = replace(jpeg, port=port, concurrency=top, measure_s=plan.grpc_s)
        grpc_spec = replace(http_spec, port=grpc_port, path=GRPC_INFER, bodies=infer, content_type="", protocol="grpc",
                            metrics_port=port)
        # The machine's speed drifts over minutes: windows in the order HTTP, gRPC, gRPC, HTTP (ABBA)
        # give both protocols the same share of a steady drift (HTTP, gRPC alone with --quick).
        points: dict[str, Any] = {"http": [], "grpc": []}
        order = ("http", "grpc") if plan.mode == "quick" else ("http", "grpc", "grpc", "http")
        for protocol in order:
            spec, label = (http_spec, "HTTP raw") if protocol == "http" else (grpc_spec, "gRPC")
            points[protocol] += sweep(server, spec, (top,), work, label)
        do_nothing = _do_nothing_spec(work, port, model, plan, seconds)
        points["http_do_nothing"] = sweep(server, do_nothing, (top,), work, "HTTP do-nothing", ok_status=400)[0]
        points["grpc_do_nothing"] = sweep(server, replace(do_nothing, port=grpc_port, path=GRPC_INFER, bodies=[nothing],
                                                          content_type="", protocol="grpc"),
                                          (top,), work, "gRPC do-nothing", ok_status=400)[0]
    return {"flags": [*server_flags(plan), *extra], "cold_start_s": server.cold_start_s, "order": list(order), **points}


GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _grpc_body(path: Path, model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> str:
    """A serialized V2 ModelInferRequest with one input as raw contents, written to ``path``."""
    request = open_inference_pb2.ModelInferRequest(model_name=model, raw_input_contents=[raw])
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    path.write_bytes(request.SerializeToString())
    return str(path)


def variant_stage(plan: Plan, name: str, change: dict[str, int], levels: tuple[int, ...], base: Path, jpeg: LoadSpec,
                  work: Path) -> dict[str, Any]:
    """The same load at the given concurrencies against the server with other settings."""
    variant = replace(plan, **change)
    port = free_port()
    say(f"headswap, {name}: {' '.join(server_flags(variant))}")
    with running(headswap_cmd(base, port, variant), "/ready", port, work / f"variant-{port}.log", signal.SIGTERM) as server:
        layout = served_layout(server.log)
        points = sweep(server, replace(jpeg, port=port), levels, work, name)
    return {"name": name, "max_batch_size": variant.max_batch_size, "workers": variant.workers, "flags": server_flags(variant),
            "cold_start_s": server.cold_start_s, "points": points, "layout": layout}


def running_reference(base: Path, port: int, log: Path) -> contextlib.AbstractContextManager[Running]:
    """The plain LitServe reference server (``bench/reference_server.py``) serving ``base``, ready."""
    cmd = [sys.executable, "-m", "bench.reference_server", "--checkpoint", str(base), "--port", str(port)]
    # LitServe 0.2.19 has no SIGTERM handler: its main process dies at once and ``running`` ends
    # the rest of its session. Nothing is measured by then.
    return running(cmd, "/health", port, log, signal.SIGTERM, env={"PYTHONPATH": str(ROOT)})


def running_torchserve(base: Path, port: int, jpeg: LoadSpec, work: Path) -> contextlib.AbstractContextManager[Running]:
    """TorchServe with its defaults (``bench/torchserve_peer.py``) serving ``base``, ready. Its
    ``/ping`` answers before its workers have loaded the model: ready here is a first answered
    prediction."""
    folder = work / "torchserve"
    folder.mkdir(exist_ok=True)
    cmd = torchserve_peer.command(base, port, free_port(), free_port(), folder)
    return running(cmd, f"/predictions/{torchserve_peer.MODEL}", port, folder / "torchserve.log", signal.SIGTERM,
                   ready_body=Path(jpeg.bodies[0]).read_bytes(), content_type=jpeg.content_type)


def reference_stage(plan: Plan, base: Path, spec: LoadSpec, work: Path) -> dict[str, Any]:
    port = free_port()
    say("plain LitServe reference (JSON base64 body, PIL decode in decode_request, LitServe defaults)")
    with running_reference(base, port, work / "reference.log") as server:
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
    parser.add_argument("--quick", action="store_true", help="short check (about 5 min): concurrency 1 and 16, short windows")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--arch", default="", help="default: resnet18 on cpu, resnet50 on cuda")
    parser.add_argument("--max-batch-size", type=int, default=0, help="server max batch size (default: the server's)")
    parser.add_argument("--workers", type=int, default=0, help="server workers per device (default: the server's choice)")
    parser.add_argument("--decode-on", choices=("api", "worker"), default="api", help="the server's --decode-on")
    parser.add_argument("--api-servers", type=int, default=0, help="the server's --api-servers (default: the server's)")
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
