"""A small uvicorn server in a thread of the main process (admin or metrics on their own port).

Its socket is bound when it is built, at start-up, before any worker starts: a taken port fails
start-up at once with one clear line, instead of a server that is half up. ``answers`` tells
when it serves HTTP, which readiness waits for.
"""

from __future__ import annotations

import http.client
import socket
import threading

import uvicorn
from fastapi import FastAPI


def local_address(host: str) -> str:
    """An address of this machine that reaches a server listening on ``host`` (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def check_bindable(host: str, port: int, what: str) -> None:
    """Raise OSError (one line: what, where, why) if ``host:port`` cannot be listened on now."""
    listen_socket(host, port, what).close()


def listen_socket(host: str, port: int, what: str) -> socket.socket:
    """A socket bound to ``host:port`` and listening, as uvicorn would bind it. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class SidecarServer:
    def __init__(self, app: FastAPI, host: str, port: int, name: str) -> None:
        self.socket = listen_socket(host, port, f"{name} port")
        self.address = (local_address(host), port)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name=f"{name}-server")

    def start(self) -> None:
        self.thread.start()

    def answers(self) -> bool:
        """True once an HTTP request to it gets any HTTP answer."""
        if not self.server.started:
            return False
        conn = http.client.HTTPConnection(*self.address, timeout=1)
        try:
            conn.request("GET", "/")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=5)
        self.socket.close()
