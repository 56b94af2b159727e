"""Start a real ``headswap serve`` process on a free port and talk HTTP to it.

In the manner of uvicorn's own test helpers: a free port from the OS, readiness by polling
``/ready`` (no sleeps, no log scraping), and an end by pid with SIGTERM, checking that the
server exited 0 and left no process of its session behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

HEADSWAP = str(Path(sys.executable).parent / "headswap")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def proc_stat(path: Path) -> list[str]:
    """The fields of ``path``/stat (a /proc process or task) after the command name, which may hold
    spaces: [0] is the state, [3] the session, [11] and [12] utime and stime, [16] the niceness."""
    return (path / "stat").read_text().rsplit(")", 1)[1].split()


def session_pids(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (the server and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = proc_stat(entry)
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def wait_gone(sid: int, timeout: float = 10.0) -> list[str]:
    """Wait for the session's processes to end; returns the command lines of any left."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") for pid in pids
            if Path(f"/proc/{pid}/cmdline").exists()]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} not ready after {timeout} s")


def stop(server: Server, timeout: float = 60.0) -> int:
    """SIGTERM the server, wait for it, and return its exit code; kills leftovers."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        raise
    return code


@contextmanager
def run_server(checkpoint: Path, tmp: Path, *args: str, env: dict[str, str] | None = None,
               ready: bool = True) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [HEADSWAP, "serve", "--checkpoint", str(checkpoint), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})},
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        if ready:
            wait_ready(server.url, proc)
        yield server
    finally:
        if proc.poll() is None:
            stop(server)
        leftovers = session_pids(proc.pid)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)


def sigterm_under_load(server: Server, paths: list[str], body: Callable[[int], bytes]) -> tuple[int, list[int]]:
    """One keep-alive client per path posting JPEGs (``body(i)``, up to 200 each); once one is answered,
    SIGTERM the server and wait for it. Returns its exit code and every status the clients got; a
    client stops at its first refused connection (the server stopped accepting, as it should)."""
    results: list[int] = []
    started = threading.Event()

    def client(path: str) -> None:
        session = requests.Session()
        for i in range(200):
            try:
                response = session.post(f"{server.url}{path}", data=body(i), headers={"Content-Type": "image/jpeg"},
                                        timeout=30)
            except requests.ConnectionError:
                return
            results.append(response.status_code)
            started.set()

    return sigterm_while(server, [lambda path=path: client(path) for path in paths], started)[0], results


def sigterm_while(server: Server, clients: list[Callable[[], None]], started: threading.Event) -> tuple[int, float]:
    """Run each client in a thread of its own; once ``started`` is set (an answer came), SIGTERM the
    server and wait for it and for the clients. Returns the server's exit code and when (time.monotonic)
    the signal was sent."""
    threads = [threading.Thread(target=client) for client in clients]
    for thread in threads:
        thread.start()
    assert started.wait(60)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = stop(server)
    for thread in threads:
        thread.join(60)
    return code, signalled
