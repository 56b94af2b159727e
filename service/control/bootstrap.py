"""What a server serves when it starts, and the rollout-file watcher.

Precedence at start-up: an existing rollout file wins; else the state persisted in
``--state-dir`` (a restarted pod comes back serving what it served); else ``--checkpoint`` and
``--model``.
A malformed or unservable spec is refused like a bad checkpoint: the server serves the
fallback and reports the error in ``/admin/models`` and the metrics.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from service.control.controller import Controller
from service.control.rollout import DEFAULT_MODEL, RolloutFile, RolloutSpec, RolloutSpecError, spec_of
from service.control.slots import ModelState, ServingState, SharedState, SlotSpec
from service.control.store import CheckpointStore
from service.errors import RequestError
from service.settings import Settings

log = logging.getLogger("headswap.rollout")
POLL_S = 2.0


def bootstrap(settings: Settings, controller: Controller, shared: SharedState, store: CheckpointStore,
              rollout: RolloutFile | None) -> tuple[ServingState, tuple[int, int, int] | None]:
    """Write the initial shared state (before any worker starts).

    Returns the state and the rollout file's stamp as read, for ``watch_rollout`` to start from.
    """
    shared.create_dirs()
    for stale in shared.workers.glob("*.json"):
        stale.unlink()
    persisted = _persisted(shared)
    spec, spec_error, stamp = None, None, None
    if rollout is not None and rollout.path.exists():
        stamp = rollout.stamp()
        try:
            spec = rollout.read()
        except RolloutSpecError as exc:
            spec_error = str(exc)
    if persisted is not None:
        state = persisted.next(rollout_error=None)
    elif spec is not None and not (settings.checkpoint or settings.model):
        state = _first_of(spec, settings, controller)
    else:
        state = _from_settings(settings, controller, store)
    shared.write(state)
    if spec is not None:
        try:
            controller.converge(spec, caller="startup")
        except RequestError as exc:
            spec_error = f"rollout spec not applied: {exc}"
    if spec_error:
        log.error("%s; serving %s", spec_error, {name: m.stable.version for name, m in shared.read().models.items()})
        controller.record_rollout_error(spec_error)
    elif rollout is not None and not rollout.path.exists() and rollout.writable():
        rollout.write(spec_of(shared.read()))
        stamp = rollout.stamp()
    controller.live = True
    return shared.read(), stamp


def _from_settings(settings: Settings, controller: Controller, store: CheckpointStore) -> ServingState:
    """``--checkpoint`` (named by --model-name, else by its metadata) and every ``--model NAME=CHECKPOINT``."""
    models: dict[str, ModelState] = {}
    if settings.checkpoint:
        spec = controller.materialize(_store_name(settings.checkpoint, store)).spec
        models[settings.model_name or _named(spec)] = ModelState(stable=spec)
    for name, checkpoint in settings.named_models:
        if name in models:
            raise ValueError(f"model name {name!r} is given twice (--checkpoint is named {name!r} by its metadata)")
        models[name] = ModelState(stable=controller.materialize(_store_name(checkpoint, store)).spec)
    return ServingState(generation=1, models=models, default=next(iter(models)))


def _first_of(spec: RolloutSpec, settings: Settings, controller: Controller) -> ServingState:
    """A state to converge from when only the rollout spec says what to serve: its first model."""
    if not spec.models:
        raise ValueError(f"the rollout spec serves no model: {'; '.join(spec.errors.values())}")
    key, entry = next(iter(spec.models.items()))
    stable = controller.materialize(entry.stable, entry.stable_merges).spec
    name = key if key != DEFAULT_MODEL else settings.model_name or _named(stable)
    return ServingState(generation=1, models={name: ModelState(stable=stable)}, default=name)


def _named(spec: SlotSpec) -> str:
    """A model's name from its checkpoint's metadata (its name, else its architecture)."""
    return str(spec.meta.get("name") or spec.meta["arch"])


def _persisted(shared: SharedState) -> ServingState | None:
    if not shared.exists():
        return None
    try:
        state = shared.read()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable persisted state: %s", exc)
        return None
    if all(shared.blob(spec.version).is_file() for _, _, spec in state.served()):
        log.info("restoring persisted state: %s", {f"{name}/{slot}": spec.version for name, slot, spec in state.served()})
        return state
    log.warning("persisted state refers to missing weights; starting from --checkpoint")
    return None


def _store_name(checkpoint: str, store: CheckpointStore) -> str:
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists():
        return checkpoint  # already a store-relative name
    try:
        return store.relative(path)
    except ValueError:
        raise ValueError(f"--checkpoint {checkpoint} is outside the checkpoint store {store.root}: "
                         "put it there or point --checkpoint-dir at its folder") from None


def watch_rollout(rollout: RolloutFile, controller: Controller, stop: threading.Event,
                  seen: tuple[int, int, int] | None) -> None:
    """Converge whenever the rollout file changes (mtime, size or inode) from ``seen``, every few seconds."""
    while not stop.wait(POLL_S):
        stamp = rollout.stamp()
        if stamp == seen or stamp is None:
            continue
        seen = stamp
        try:
            result = controller.converge(rollout.read())
            if result is not None:
                log.info("rollout file applied: %s", result["versions"])
        except RequestError as exc:
            log.error("rollout file refused, still serving the current models: %s", exc)
            controller.record_rollout_error(str(exc))
        except Exception:  # noqa: BLE001 - the watcher must outlive any one bad spec
            log.exception("rollout file could not be applied")
