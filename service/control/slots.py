"""What each slot serves, shared by every process of one server.

``SharedState`` is the one object through which the main process, the forked API servers and
the spawned inference workers agree on what is served: a folder holding ``state.json`` (the
desired slots, canary weight and shadow share, written atomically under a file lock by the
controller), ``blobs/<version>.safetensors`` (the exact weights of every served version,
merges included, so a restarted worker reloads the same tensors) and ``workers/<id>.json``
(each worker's acknowledgement of the generation it applied). Reads are cached by the file's
mtime and size, so checking for a change costs one ``stat``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

from models import CheckpointMeta
from service.errors import NotFound
from service.protocols.admin import Slot

SLOT_NAMES: tuple[str, ...] = get_args(Slot)  # ("stable", "canary")


@dataclass(frozen=True)
class SlotSpec:
    """One slot's content: where it came from and the exact weights it serves."""

    checkpoint: str                      # store-relative name of the base checkpoint
    merges: tuple[str, ...] = ()         # store-relative partial checkpoints merged on top, in order
    version: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    loaded_at: str = ""
    merge_report: dict[str, Any] | None = None
    backbone: str = ""  # the backbone version: the content hash of the tensors outside the head (models.shared)

    @property
    def checkpoint_meta(self) -> CheckpointMeta:
        return CheckpointMeta.from_dict(self.meta)

    def public(self) -> dict[str, Any]:
        """The slot as GET /admin/models shows it."""
        return {
            "checkpoint": self.checkpoint, "merges": list(self.merges), "version": self.version,
            "arch": self.meta.get("arch"), "num_classes": self.meta.get("num_classes"),
            "class_names": self.meta.get("class_names"), "loaded_at": self.loaded_at,
            "merge_report": self.merge_report, "backbone": self.backbone,
        }


@dataclass(frozen=True)
class ModelState:
    """One served model: its slots, the canary's weight and shadow share, and what to roll back to."""

    stable: SlotSpec
    canary: SlotSpec | None = None
    weight: int = 0
    shadow: int = 0
    previous_stable: SlotSpec | None = None
    rollout_error: str | None = None  # its entry in the rollout spec was refused (the others were applied)

    def slots(self) -> dict[str, SlotSpec]:
        return {"stable": self.stable, **({"canary": self.canary} if self.canary else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelState:
        def slot(value: Any) -> SlotSpec | None:
            return None if value is None else SlotSpec(**{**value, "merges": tuple(value.get("merges", ()))})

        stable = slot(data["stable"])
        assert stable is not None
        return cls(**{**data, "stable": stable, "canary": slot(data.get("canary")),
                      "previous_stable": slot(data.get("previous_stable"))})


@dataclass(frozen=True)
class ServingState:
    """Every served model by name (``default`` answers /predict), under one generation that every
    worker acknowledges."""

    generation: int
    models: dict[str, ModelState]
    default: str
    revision: str | None = None
    rollout_error: str | None = None

    def model(self, name: str | None = None) -> ModelState:
        """Model ``name`` (None: the default one). Raises KeyError for a name not served."""
        return self.models[self.default if name is None else name]

    def name_of(self, model: str | None) -> str:
        """The served model ``model`` names (None: the default). Raises NotFound naming the served ones."""
        name = self.default if model is None else model
        if name not in self.models:
            raise NotFound(f"unknown model {name[:80]!r}: this server serves {', '.join(repr(n) for n in self.names())}",
                           reason="model")
        return name

    def names(self) -> list[str]:
        """The served models' names, the default first."""
        return [self.default, *(name for name in self.models if name != self.default)]

    def served(self) -> Iterator[tuple[str, str, SlotSpec]]:
        """(model, slot, spec) of every served slot."""
        for name, model in self.models.items():
            for slot, spec in model.slots().items():
                yield name, slot, spec

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingState:
        if "models" not in data:  # one model, as an earlier release persisted it
            one = ModelState.from_dict({k: v for k, v in data.items() if k not in ("generation", "revision", "rollout_error")})
            name = one.stable.meta.get("name") or one.stable.meta.get("arch") or "model"
            return cls(generation=data["generation"], models={name: one}, default=name, revision=data.get("revision"),
                       rollout_error=data.get("rollout_error"))
        models = {name: ModelState.from_dict(value) for name, value in data["models"].items()}
        return cls(**{**data, "models": models})

    def next(self, **changes: Any) -> ServingState:
        return replace(self, generation=self.generation + 1, **changes)

    def with_model(self, name: str, model: ModelState | None, **changes: Any) -> ServingState:
        """The next generation with model ``name`` set to ``model`` (None: removed)."""
        models = {k: v for k, v in self.models.items() if k != name}
        if model is not None:
            models = {**self.models, name: model} if name in self.models else {**models, name: model}
        return self.next(models=models, **changes)


@dataclass(frozen=True)
class WorkerAck:
    worker: str
    pid: int
    generation: int
    versions: dict[str, dict[str, str]]  # model -> slot -> version
    error: str | None = None
    resident: list[str] | None = None  # the models whose weights it holds (None: all it serves)


class SharedState:
    """The shared serving state of one server (see module docstring); safe across processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.workers = root / "workers"
        self.path = root / "state.json"  # built once: read() runs several times per request
        self._cache: tuple[tuple[int, int, int], ServingState] | None = None

    def create_dirs(self) -> None:
        for path in (self.root, self.blobs, self.workers):
            path.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> ServingState:
        """The current state; re-parsed only when the file changed."""
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, ServingState.from_dict(json.loads(self.path.read_text())))
        return self._cache[1]

    def write(self, state: ServingState) -> None:
        atomic_write(self.path, state.to_json())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise state changes across processes (admin calls, rollout watcher, guard)."""
        with open(self.root / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def blob(self, version: str) -> Path:
        return self.blobs / f"{version}.safetensors"

    def ack(self, ack: WorkerAck) -> None:
        atomic_write(self.workers / f"{ack.worker}.json", json.dumps(asdict(ack)))

    def acks(self) -> dict[str, WorkerAck]:
        found = {}
        for path in self.workers.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, TypeError):
                found[path.stem] = WorkerAck(**json.loads(path.read_text()))
        return found

    def held(self) -> tuple[set[str], set[str]]:
        """The models every worker serves, and those every worker holds in memory (empty: no worker yet)."""
        acks = self.acks().values()
        serving = [set(ack.versions) for ack in acks]
        holding = [set(ack.versions if ack.resident is None else ack.resident) for ack in acks]
        return (set.intersection(*serving), set.intersection(*holding)) if serving else (set(), set())

    def record_rejection(self, rejection: dict[str, Any]) -> None:
        """The last refused checkpoint (admin load or rollout spec); it changes nothing else."""
        atomic_write(self.root / "rejection.json", json.dumps(rejection))

    def last_rejection(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / "rejection.json").read_text())
        except (OSError, ValueError):
            return None

    def wait_for(self, generation: int, workers: int, timeout: float) -> dict[str, WorkerAck]:
        """Wait until ``workers`` workers acknowledged ``generation`` (or any reported an error)."""
        deadline = time.monotonic() + timeout
        while True:
            acks = {w: a for w, a in self.acks().items() if a.generation >= generation}
            if len(acks) >= workers or any(a.error for a in acks.values()) or time.monotonic() > deadline:
                return acks
            time.sleep(0.02)


def _after(tmp: str, path: Path) -> None:
    """Date ``tmp`` after ``path``: readers key caches on (mtime, size, inode), and with a coarse clock and a
    reused inode two quick same-size writes would otherwise repeat a key and hide the second write."""
    try:
        old = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return
    if os.stat(tmp).st_mtime_ns <= old:
        os.utime(tmp, ns=(old + 1, old + 1))


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _after(tmp, path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
