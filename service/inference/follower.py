"""How a worker follows the shared state: prepare new weights beside the served ones, then
switch between batches, so no batch ever runs on a mix of old and new tensors."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from models import load_checkpoint
from service.control.slots import SLOT_NAMES, ServingState, SharedState, SlotSpec, WorkerAck
from service.inference.engine import Engine, Loaded

log = logging.getLogger("headswap.worker")
KEEP_WARM = 4  # prepared versions kept in memory: stable, canary, previous stable, one spare


class SlotFollower:
    def __init__(self, engine: Engine, shared: SharedState, worker_id: str) -> None:
        self.engine = engine
        self.shared = shared
        self.worker_id = worker_id
        self.applied = -1
        self.warm: OrderedDict[str, Loaded] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self._pending: tuple[int, Future[dict[str, Loaded | None]]] | None = None

    def catch_up(self) -> None:
        """Start-up: load what the shared state says, synchronously."""
        state = self.shared.read()
        self._install(state.generation, self._prepare(state))

    def poll(self) -> None:
        """Between batches: start preparing a new generation, or install one that is ready."""
        state = self.shared.read()
        if state.generation != self.applied and self._pending is None:
            self._pending = (state.generation, self._pool.submit(self._prepare, state))
        if self._pending is not None and self._pending[1].done():
            generation, future = self._pending
            self._pending = None
            try:
                self._install(generation, future.result())
            except Exception as exc:  # noqa: BLE001 - reported to the controller, which rolls back
                log.exception("worker %s could not apply generation %d", self.worker_id, generation)
                self.applied = generation
                self.shared.ack(WorkerAck(self.worker_id, os.getpid(), generation, self._versions(), f"{type(exc).__name__}: {exc}"))

    def _prepare(self, state: ServingState) -> dict[str, Loaded | None]:
        slots: dict[str, SlotSpec | None] = {"stable": state.stable, "canary": state.canary}
        return {name: None if spec is None else self._loaded(spec) for name, spec in slots.items()}

    def _loaded(self, spec: SlotSpec) -> Loaded:
        if spec.version in self.warm:
            self.warm.move_to_end(spec.version)
            return self.warm[spec.version]
        blob = self.shared.blob(spec.version)
        loaded = load_checkpoint(blob)
        if loaded.version != spec.version:
            raise ValueError(f"blob {blob.name} holds version {loaded.version}, expected {spec.version}")
        prepared = self.engine.prepare(loaded.state, loaded.meta, loaded.version, spec.checkpoint)
        self.warm[spec.version] = prepared
        while len(self.warm) > KEEP_WARM:
            self.warm.popitem(last=False)
        return prepared

    def _install(self, generation: int, prepared: dict[str, Loaded | None]) -> None:
        for name in SLOT_NAMES:
            self.engine.install(name, prepared.get(name))
        self.applied = generation
        self.shared.ack(WorkerAck(self.worker_id, os.getpid(), generation, self._versions()))

    def _versions(self) -> dict[str, str]:
        return {name: loaded.version for name, loaded in self.engine.slots.items()}
