"""A small uvicorn server in a thread of the main process (admin or metrics on their own port)."""

from __future__ import annotations

import threading

import uvicorn
from fastapi import FastAPI


class SidecarServer:
    def __init__(self, app: FastAPI, host: str, port: int, name: str) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name=f"{name}-server")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
