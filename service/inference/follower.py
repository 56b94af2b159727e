"""How a worker follows the shared state: prepare new weights beside the served ones, then
switch between batches, so no batch ever runs on a mix of old and new tensors."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch

from models import CheckpointMeta, load_checkpoint
from service.control.slots import ServingState, SharedState, SlotSpec, WorkerAck
from service.inference.engine import Engine, Loaded

log = logging.getLogger("headswap.worker")
KEEP_SPARE = 2  # prepared versions kept in memory beyond those served (a rollback, a swap back)


class SlotFollower:
    def __init__(self, engine: Engine, shared: SharedState, worker_id: str) -> None:
        self.engine = engine
        self.shared = shared
        self.worker_id = worker_id
        self.applied = -1
        self.warm: OrderedDict[str, Loaded] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self._pending: tuple[int, Future[Prepared]] | None = None

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
                self._ack(generation, f"{type(exc).__name__}: {exc}")

    def _prepare(self, state: ServingState) -> Prepared:
        served = {(name, slot): self._loaded(spec) for name, slot, spec in state.served()}
        keep = {loaded.version for loaded in served.values()}
        spares = [v for v in self.warm if v not in keep]
        kept = 0 if self.engine.budget_bytes else KEEP_SPARE  # under a memory budget, only what is served stays
        for version in spares[:max(0, len(spares) - kept)]:  # the least recently used go first
            del self.warm[version]
        return Prepared(served, state.names())

    def _loaded(self, spec: SlotSpec) -> Loaded:
        if spec.version in self.warm:
            self.warm.move_to_end(spec.version)
            return self.warm[spec.version]
        blob = self.shared.blob(spec.version)
        loaded = load_checkpoint(blob)
        if loaded.version != spec.version:
            raise ValueError(f"blob {blob.name} holds version {loaded.version}, expected {spec.version}")
        prepared = self.engine.prepare(loaded.state, loaded.meta, loaded.version, spec.checkpoint, spec.backbone or None)
        self.engine.events.append(("load", spec.version, "start" if self.applied < 0 else "admin"))
        self.warm[spec.version] = prepared
        return prepared

    def reload(self, version: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
        """A served version's state and meta from its blob, to load it again once evicted."""
        loaded = load_checkpoint(self.shared.blob(version))
        return loaded.state, loaded.meta

    def report_residency(self) -> None:
        """Say which models this worker holds now (after a cold load or an eviction)."""
        self._ack(self.applied)

    def _install(self, generation: int, prepared: Prepared) -> None:
        self.engine.install(prepared.served, prepared.names)
        self.applied = generation
        self._ack(generation)

    def _ack(self, generation: int, error: str | None = None) -> None:
        self.shared.ack(WorkerAck(self.worker_id, os.getpid(), generation, self._versions(), error,
                                  resident=self.engine.resident_models()))

    def _versions(self) -> dict[str, dict[str, str]]:
        versions: dict[str, dict[str, str]] = {}
        for (model, slot), loaded in self.engine.slots.items():
            versions.setdefault(model, {})[slot] = loaded.version
        return versions


class Prepared(NamedTuple):
    """A generation made ready beside the served one: every (model, slot)'s version, and the models, the default first."""

    served: dict[tuple[str, str], Loaded]
    names: list[str]
