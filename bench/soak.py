"""Soak: tens of thousands of /predict requests through hot-swaps and canaries, watching for leaks.

A real server (2 workers, admin token, its own Prometheus multiprocess folder) takes closed-loop
load from a few clients on loopback. Every ``--swap-every`` requests the admin API alternates a
stable replace with a canary (load, weight 10, then promote or rollback half an interval later).
Every ``--sample-every`` requests it records each server process's RSS and open file descriptors
and the size of the metrics folder. The summary goes to stdout and to ``--out`` (docs/soak.md).

    .venv/bin/python -m bench.soak        # the full run, 20,000 requests (make soak)
    .venv/bin/python -m bench.soak --requests 2000 --swap-every 400 --sample-every 200   # a quick check

Run it from the repository root with ``-m``: it reuses ``tests/server.py`` to start and stop the
server. A short run's RSS verdicts are not meaningful: each API server keeps ~40 MiB more after
the first admin load it handles, each worker ~150 MiB more until its cache of warm versions is
full (4), and a short warm-up ends before that.

Exits 1 when a judgement fails: any request that is not a 200, any admin call that fails, a
process that died or was replaced, RSS after warm-up spreading more than ``--rss-bound-mib`` or
growing more than ``--slope-bound-mib`` per 1,000 requests, fds spreading more than 5, or the
metrics folder gaining files or more than 1 MiB after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
import torch

from models import CheckpointMeta, build_classifier, save_checkpoint
from tests.images import jpeg
from tests.server import Server, run_server, session_pids

MIB = 1024 * 1024
TOKEN = "soak-admin-token"
CLASSES = [f"class{i}" for i in range(7)]
FD_BOUND = 5
METRICS_BYTES_BOUND = MIB
CANARY_WEIGHT = 10


@dataclass
class Sample:
    requests: int
    rss: dict[str, int]  # "role pid" -> bytes
    fds: dict[str, int]
    metrics_files: int
    metrics_bytes: int


@dataclass
class Swap:
    at: int
    action: str
    status: int | str
    seconds: float


@dataclass
class Load:
    """Closed-loop /predict clients: each sends its next request as soon as the last one returned."""

    url: str
    total: int
    images: list[bytes]
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    done: int = 0
    statuses: Counter = field(default_factory=Counter)
    slots: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def client(self) -> None:
        with requests.Session() as session:
            while True:
                with self.lock:
                    if self.issued >= self.total:
                        return
                    n, self.issued = self.issued, self.issued + 1
                started = time.perf_counter()
                try:
                    r = session.post(f"{self.url}/predict", data=self.images[n % len(self.images)],
                                     headers={"Content-Type": "image/jpeg"}, timeout=60)
                    status, slot = str(r.status_code), r.headers.get("X-Model-Slot", "none")
                except requests.RequestException as exc:
                    status, slot = type(exc).__name__, "none"
                elapsed = time.perf_counter() - started
                with self.lock:
                    self.done += 1
                    self.statuses[status] += 1
                    self.slots[slot] += 1
                    self.latencies.append(elapsed)


def make_store(root: Path, count: int) -> list[str]:
    """``count`` resnet18 checkpoints with different seeded weights; returns their store names."""
    names = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = build_classifier("resnet18", len(CLASSES))
        save_checkpoint(root / f"v{seed}.safetensors", model.state_dict(),
                        CheckpointMeta.for_arch("resnet18", CLASSES, name="resnet18-soak"))
        names.append(f"v{seed}.safetensors")
    return names


def admin(server: Server, method: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, f"{server.url}/admin/{path}", json=body,
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)


class Swapper:
    """The hot-swap schedule: even steps replace the stable slot, odd steps load a canary at weight
    10 that is promoted or rolled back (alternately) half a step later."""

    def __init__(self, server: Server, names: list[str]) -> None:
        self.server = server
        self.names = names
        self.stable = names[0]
        self.canary: str | None = None
        self.step = 0
        self.resolve_at: int | None = None
        self.swaps: list[Swap] = []

    def _call(self, at: int, action: str, path: str, body: dict | None = None) -> bool:
        started = time.monotonic()
        response = admin(self.server, "POST", path, body)
        self.swaps.append(Swap(at, action, response.status_code, time.monotonic() - started))
        if response.status_code != 200:
            print(f"  admin {action} at {at}: {response.status_code} {response.text[:300]}", flush=True)
        return response.status_code == 200

    def _other(self, *taken: str | None) -> str:
        return next(n for n in self.names[self.step % len(self.names):] + self.names if n not in taken)

    def swap(self, at: int, interval: int) -> None:
        if self.step % 2 == 0:
            target = self._other(self.stable)
            if self._call(at, f"replace stable -> {target}", "load", {"checkpoint": target}):
                self.stable = target
        else:
            target = self._other(self.stable)
            if self._call(at, f"canary {target}", "load", {"checkpoint": target, "slot": "canary"}):
                self.canary = target
                self._call(at, f"weight {CANARY_WEIGHT}", "canary", {"weight": CANARY_WEIGHT})
                self.resolve_at = at + interval // 2
        self.step += 1

    def resolve(self, at: int) -> None:
        if (self.step // 2) % 2 == 1:
            if self._call(at, "promote", "promote"):
                self.stable = self.canary or self.stable
        else:
            self._call(at, "rollback", "rollback")
        self.canary, self.resolve_at = None, None


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on ``port`` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def fd_targets(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed meanwhile
            pass
    return targets


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def roles(server: Server, port: int) -> dict[int, str]:
    """Every live process of the server's session by role: main, api (holds the listening socket),
    worker (acknowledged the shared state) or other (the request queue's process, LitServe's manager
    and the like)."""
    workers = {w["pid"] for w in admin(server, "GET", "models").json()["workers"].values()}
    listening = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    found = {}
    for pid in sorted(session_pids(server.proc.pid)):
        try:
            if pid == server.proc.pid:
                found[pid] = "main"
            elif pid in workers:
                found[pid] = "worker"
            elif listening & set(fd_targets(pid)):
                found[pid] = "api"
            else:
                found[pid] = "other"
        except OSError:  # ended meanwhile
            pass
    return found


def sample(server: Server, port: int, metrics_dir: Path, done: int) -> Sample:
    rss, fds = {}, {}
    for pid, role in roles(server, port).items():
        try:
            key = f"{role} {pid}"
            rss[key], fds[key] = rss_bytes(pid), len(fd_targets(pid))
        except OSError:
            pass
    files = [p for p in metrics_dir.iterdir() if p.is_file()]
    return Sample(done, rss, fds, len(files), sum(p.stat().st_size for p in files))


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of bytes over requests, per 1,000 requests (0 for fewer than 2 points)."""
    if len(points) < 2 or len({x for x, _ in points}) < 2:
        return 0.0
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def run(args: argparse.Namespace) -> tuple[str, bool]:
    with tempfile.TemporaryDirectory(prefix="headswap-soak-") as tmp_name:
        tmp = Path(tmp_name)
        store, metrics_dir = tmp / "store", tmp / "metrics"
        store.mkdir()
        metrics_dir.mkdir()
        names = make_store(store, 3)
        env = {"HEADSWAP_ADMIN_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        server_args = ["--workers-per-device", str(args.workers), "--state-dir", str(tmp / "state")]
        started_at = datetime.datetime.now(datetime.timezone.utc)
        with run_server(store / names[0], tmp, *server_args, env=env) as server:
            port = int(server.url.rsplit(":", 1)[1])
            images = [jpeg(seed) for seed in range(8)]
            load = Load(server.url, args.requests, images)
            swapper = Swapper(server, names)
            samples = [sample(server, port, metrics_dir, 0)]
            print(f"server {server.url}: {', '.join(sorted(samples[0].rss))}", flush=True)
            threads = [threading.Thread(target=load.client, daemon=True) for _ in range(args.clients)]
            t0 = time.monotonic()
            for thread in threads:
                thread.start()
            next_sample, next_swap = args.sample_every, args.swap_every
            while any(t.is_alive() for t in threads):
                done = load.done
                if swapper.resolve_at is not None and done >= swapper.resolve_at:
                    swapper.resolve(done)
                if done >= next_swap and done < args.requests:
                    swapper.swap(done, args.swap_every)
                    next_swap += args.swap_every
                if done >= next_sample:
                    samples.append(sample(server, port, metrics_dir, done))
                    next_sample += args.sample_every
                    print(f"  {done:>6} requests, {done / (time.monotonic() - t0):5.1f}/s, "
                          f"statuses {dict(load.statuses)}, swaps {len(swapper.swaps)}", flush=True)
                time.sleep(0.05)
            wall = time.monotonic() - t0
            if swapper.resolve_at is not None:
                swapper.resolve(load.done)
            samples.append(sample(server, port, metrics_dir, load.done))
        report = summarize(args, load, swapper, samples, wall, started_at)
    return report


Verdict = tuple[bool, str]


def summarize(args: argparse.Namespace, load: Load, swapper: Swapper, samples: list[Sample], wall: float,
              started_at: datetime.datetime) -> tuple[str, bool]:
    """The Markdown report and whether every judgement passed."""
    warm = [s for s in samples if s.requests >= args.warmup] or samples[-1:]
    failures = {k: v for k, v in load.statuses.items() if k != "200"}
    admin_failures = [s for s in swapper.swaps if s.status != 200]
    first, last = set(samples[0].rss), set(samples[-1].rss)
    verdicts: list[Verdict] = [
        (not failures, f"requests: {load.done} sent, failures {failures or 'none'}"),
        (not admin_failures, f"admin calls: {len(swapper.swaps)}, failed {len(admin_failures)}"),
        (first == last, "processes: the same pids from start to end" if first == last
         else f"processes changed: gone {sorted(first - last)}, new {sorted(last - first)}"),
    ]
    rows, process_verdicts = process_table(args, warm, sorted(last, key=_role_order))
    metrics_line, metrics_verdict = metrics_summary(warm, samples[-1])
    lines = run_lines(args, load, swapper, wall, started_at, len(warm)) + [""] + rows + ["", metrics_line]
    verdicts += process_verdicts + [metrics_verdict]
    lines += ["", "## Verdict", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for ok, text in verdicts]
    lines += ["", "## RSS (MiB) and fds by sample", ""] + series_table(samples, sorted(last, key=_role_order))
    lines += ["", "## Admin calls", "", "| at request | action | status | seconds |", "|---:|---|---|---:|"]
    lines += [f"| {s.at} | {s.action} | {s.status} | {s.seconds:.2f} |" for s in swapper.swaps]
    return "\n".join(lines) + "\n", all(ok for ok, _ in verdicts)


def _role_order(key: str) -> tuple[int, str]:
    return ("main", "api", "worker", "other").index(key.split()[0]), key


def run_lines(args: argparse.Namespace, load: Load, swapper: Swapper, wall: float, started_at: datetime.datetime,
              warm_samples: int) -> list[str]:
    lat = sorted(load.latencies) or [0.0]
    actions = Counter(s.action.split()[0] for s in swapper.swaps)
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.soak", *sys.argv[1:]])
    host = (f"{os.cpu_count()} CPUs, torch {torch.__version__}; server: {args.workers} workers, resnet18 (7 classes); "
            f"{args.clients} closed-loop clients on loopback")
    latency = f"p50 {lat[len(lat) // 2] * 1000:.0f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms"
    swaps = (f"{actions['replace']} stable replaces, {actions['canary']} canary loads (weight {CANARY_WEIGHT}), "
             f"{actions['promote']} promotes, {actions['rollback']} rollbacks; slowest admin call "
             f"{max((s.seconds for s in swapper.swaps), default=0):.1f} s")
    return [
        "# Soak run", "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        f"- host: {host}",
        f"- {load.done} requests in {wall:.0f} s ({load.done / wall:.1f}/s); latency {latency}",
        f"- statuses: {dict(load.statuses)}; answered by slot: {dict(load.slots)}",
        f"- hot-swaps: {swaps}",
        f"- RSS and fds sampled every {args.sample_every} requests; judged after {args.warmup} ({warm_samples} samples)",
    ]


def process_table(args: argparse.Namespace, warm: list[Sample], keys: list[str]) -> tuple[list[str], list[Verdict]]:
    rows = ["| process | RSS min MiB | RSS max MiB | RSS last MiB | max-min MiB | slope MiB/1k req | fds min | fds max |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts: list[Verdict] = []
    for key in keys:
        points = [(s.requests, s.rss[key]) for s in warm if key in s.rss]
        fds = [s.fds[key] for s in warm if key in s.fds]
        if not points:
            continue
        rss = [y for _, y in points]
        spread, trend = max(rss) - min(rss), slope(points)
        rows.append(f"| {key} | {min(rss) / MIB:.0f} | {max(rss) / MIB:.0f} | {rss[-1] / MIB:.0f} | {spread / MIB:.1f} "
                    f"| {trend / MIB:+.2f} | {min(fds)} | {max(fds)} |")
        text = (f"{key}: RSS spread {spread / MIB:.1f} MiB (bound {args.rss_bound_mib:g}), "
                f"slope {trend / MIB:+.2f} MiB/1k requests (bound {args.slope_bound_mib:g})")
        verdicts.append((spread <= args.rss_bound_mib * MIB and trend <= args.slope_bound_mib * MIB, text))
        verdicts.append((max(fds) - min(fds) <= FD_BOUND, f"{key}: fds {min(fds)}-{max(fds)} (bound: spread {FD_BOUND})"))
    return rows, verdicts


def series_table(samples: list[Sample], keys: list[str]) -> list[str]:
    rows = ["| requests | " + " | ".join(keys) + " | metrics files | metrics MiB |", "|---:|" + "---:|" * (len(keys) + 2)]
    for s in samples:
        cells = [f"{s.rss[k] / MIB:.0f} / {s.fds[k]}" if k in s.rss else "-" for k in keys]
        rows.append(f"| {s.requests} | " + " | ".join(cells) + f" | {s.metrics_files} | {s.metrics_bytes / MIB:.1f} |")
    return rows


def metrics_summary(warm: list[Sample], last: Sample) -> tuple[str, Verdict]:
    files = [s.metrics_files for s in warm]
    sizes = [s.metrics_bytes for s in warm]
    line = (f"Prometheus multiprocess folder after warm-up: {min(files)}-{max(files)} files, "
            f"{min(sizes) / MIB:.1f}-{max(sizes) / MIB:.1f} MiB (at the end: {last.metrics_files} files, "
            f"{last.metrics_bytes / MIB:.1f} MiB)")
    ok = max(files) == min(files) and max(sizes) - min(sizes) <= METRICS_BYTES_BOUND
    text = (f"metrics folder: {min(files)}-{max(files)} files, growth {(max(sizes) - min(sizes)) / MIB:.1f} MiB "
            f"(bounds: no new files, {METRICS_BYTES_BOUND // MIB} MiB)")
    return line, (ok, text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000, help="total /predict requests (default 20000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="server inference workers (default 2)")
    parser.add_argument("--swap-every", type=int, default=2000, help="requests between hot-swaps (default 2000)")
    parser.add_argument("--sample-every", type=int, default=1000, help="requests between samples (default 1000)")
    parser.add_argument("--warmup", type=int, help="requests before RSS/fds/metrics are judged "
                        "(default: 4000, or a fifth of --requests when that is less)")
    parser.add_argument("--rss-bound-mib", type=float, default=64, help="largest RSS spread per process after warm-up")
    parser.add_argument("--slope-bound-mib", type=float, default=1.0, help="largest RSS growth per 1,000 requests")
    parser.add_argument("--out", type=Path, default=Path("docs/soak.md"), help="where the report goes (overwritten)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(4000, args.requests // 5)
    if args.requests < 1 or args.clients < 1 or args.swap_every < 1 or args.sample_every < 1:
        parser.error("--requests, --clients, --swap-every and --sample-every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report, ok = run(args)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}; {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
