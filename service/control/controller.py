"""Where a new checkpoint becomes the served one: validate, materialise, switch every worker.

Every mutation (admin call, rollout spec, canary guard) goes through ``Controller`` under the
shared state's file lock: the candidate is loaded safely, merged if asked, checked against
the slot (architecture, class count), warmed up on the CPU (finite outputs of the right
shape) and written as a blob; only then does a new state generation tell the workers to
switch, and the call returns once every worker acknowledged it -- or, if one failed, after
the others were switched back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import torch

from models import (
    CheckpointError,
    IncompatibleCheckpointError,
    load_checkpoint,
    merge_state,
    save_checkpoint,
    state_version,
)
from models.checkpoint import utc_now
from models.merge import MergeReport
from service.control.audit import AuditLog
from service.control.memory import release_freed_memory
from service.control.rollout import RolloutFile, RolloutSpec, spec_of
from service.control.slots import ServingState, SharedState, SlotSpec
from service.control.store import CheckpointStore
from service.errors import Conflict, InternalError, RequestError, Unprocessable
from service.observability.metrics import Metrics

log = logging.getLogger("headswap.controller")


@dataclass(frozen=True)
class LoadRequest:
    checkpoint: str
    slot: str = "stable"
    mode: str = "replace"
    min_match: float = 0.0
    allow_new_classes: bool = False


@dataclass
class Candidate:
    spec: SlotSpec
    report: MergeReport | None


# Builds a candidate as the workers will run it and warms it up; raises IncompatibleCheckpointError
# (the state does not fit its architecture) or ValueError (a bad warm-up). The inference engine's.
Validator = Callable[[dict[str, torch.Tensor], Any, str], None]


class Controller:
    def __init__(self, shared: SharedState, store: CheckpointStore, workers: int, *, audit: AuditLog, validate: Validator,
                 rollout: RolloutFile | None = None, metrics: Metrics | None = None, swap_timeout_s: float = 120.0) -> None:
        self.shared = shared
        self.store = store
        self.workers = workers
        self.audit = audit
        self.validate = validate
        self.rollout = rollout
        self.metrics = metrics
        self.swap_timeout_s = swap_timeout_s
        self.live = False  # no workers to wait for until start-up is done

    # ---- building candidates -------------------------------------------------------------
    def materialize(self, checkpoint: str, merges: tuple[str, ...] = (), *, min_match: float = 0.0) -> Candidate:
        """Load ``checkpoint``, merge ``merges`` on top, validate, write the blob; returns the slot spec.

        Raises RequestError subclasses: 400/404 for paths, 422 for unreadable or unsafe files,
        failed merges and failed warm-ups.
        """
        try:
            base = load_checkpoint(self.store.resolve(checkpoint), private=True)  # a store file may be rewritten in place
            if base.meta.partial:
                raise Unprocessable(f"{checkpoint!r} is a partial checkpoint: load it with mode 'merge'", reason="partial")
            state, meta, report = base.state, base.meta, None
            for name in merges:
                part = load_checkpoint(self.store.resolve(name), private=True)
                if (part.meta.arch, part.meta.num_classes) != (meta.arch, meta.num_classes):
                    raise Conflict(f"{name!r} is {part.meta.arch} with {part.meta.num_classes} classes; a merge needs "
                                   f"{meta.arch} with {meta.num_classes}", reason="incompatible")
                state, report = merge_state(state, part.state, min_match=min_match)
                meta = replace(meta, parent_version=state_version(base.state))
        except IncompatibleCheckpointError as exc:
            raise Unprocessable(str(exc), reason="merge", details={"report": exc.report.to_dict()}) from None
        except CheckpointError as exc:
            name = Path(exc.path).name  # never show the server's paths: name files as the store does
            raise Unprocessable(f"checkpoint {name!r}: {exc.reason.replace(exc.path, name)}", reason="unreadable") from None
        version = state_version(state)
        self._validate_weights(state, meta, version)
        blob = self.shared.blob(version)
        if not blob.exists():
            save_checkpoint(blob, state, meta)
        spec = SlotSpec(checkpoint=checkpoint, merges=tuple(merges), version=version, meta=meta.to_dict(),
                        loaded_at=utc_now(), merge_report=report.summary() if report else None)
        return Candidate(spec, report)

    def _validate_weights(self, state: dict[str, torch.Tensor], meta: Any, version: str) -> None:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise Unprocessable(f"tensors with NaN or Inf: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
                                reason="non_finite")
        try:
            self.validate(state, meta, version)
        except IncompatibleCheckpointError as exc:
            raise Unprocessable(str(exc).split(": ", 1)[-1], reason="incompatible",
                           details={"report": exc.report.to_dict()}) from None
        except ValueError as exc:
            raise Unprocessable(f"warm-up failed: {exc}", reason="warmup") from None

    # ---- admin operations ------------------------------------------------------------------
    def load(self, req: LoadRequest, caller: str) -> dict[str, Any]:
        called = time.monotonic()
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            candidate = self._candidate(req, current)
            slot_change = {req.slot: candidate.spec}
            if req.slot == "stable":
                slot_change["previous_stable"] = current.stable
            new = current.next(**slot_change)
            result = self._commit(current, new, action="load", caller=caller, slot=req.slot,
                                  checkpoint=req.checkpoint, report=candidate.report, called=called)
        return {**result, "merge_report": candidate.report.to_dict() if candidate.report else None}

    def _candidate(self, req: LoadRequest, current: ServingState) -> Candidate:
        if req.mode == "merge":
            base = current.stable
            candidate = self._timed_materialize(req.slot, base.checkpoint, base.merges + (req.checkpoint,), req.min_match)
        else:
            candidate = self._timed_materialize(req.slot, req.checkpoint, (), 0.0)
        target = current.slots().get(req.slot) or current.stable
        got, want = candidate.spec.meta, target.meta
        if got["arch"] != want["arch"]:
            self._reject(req.slot, req.checkpoint, Conflict(f"architecture {got['arch']} does not match the {req.slot} slot's {want['arch']}",
                                            reason="arch"))
        if got["num_classes"] != want["num_classes"] and not (
            req.mode == "replace" and (req.allow_new_classes or (req.slot == "canary" and current.canary is None))
        ):
            self._reject(req.slot, req.checkpoint, Conflict(
                f"{got['num_classes']} classes where the {req.slot} slot has {want['num_classes']}: allowed only for "
                "mode 'replace' onto an empty canary or with \"allow_new_classes\": true", reason="classes"))
        return candidate

    def _timed_materialize(self, slot: str, checkpoint: str, merges: tuple[str, ...], min_match: float) -> Candidate:
        try:
            return self.materialize(checkpoint, merges, min_match=min_match)
        except RequestError as exc:
            self._reject(slot, checkpoint, exc, merges)
        finally:
            release_freed_memory()

    def _reject(self, slot: str, checkpoint: str, exc: RequestError, merges: tuple[str, ...] = ()) -> NoReturn:
        """Count and record a refused checkpoint (GET /admin/models shows the last one), then raise."""
        self.shared.record_rejection({"at": utc_now(), "slot": slot, "checkpoint": checkpoint, "merges": list(merges),
                                      "type": type(exc).__name__, "reason": exc.reason, "error": str(exc)})
        self._count_swap(slot, "rejected")
        raise exc

    def set_canary(self, weight: int, shadow: int, caller: str) -> dict[str, Any]:
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            if current.canary is None and (weight or shadow):
                raise Conflict("no canary loaded: POST /admin/load with slot 'canary' first", reason="no_canary")
            return self._commit(current, current.next(weight=weight, shadow=shadow), action="canary", caller=caller)

    def promote(self, caller: str) -> dict[str, Any]:
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            if current.canary is None:
                raise Conflict("no canary to promote", reason="no_canary")
            new = current.next(stable=current.canary, canary=None, weight=0, shadow=0, previous_stable=current.stable)
            return self._commit(current, new, action="promote", caller=caller, slot="stable")

    def rollback(self, caller: str, reason: str = "manual") -> dict[str, Any]:
        with self.shared.lock():
            current = self.shared.read()
            if reason == "manual":
                self._require_mutable()
            if current.canary is not None:
                new = current.next(canary=None, weight=0, shadow=0)
            elif reason == "manual" and current.previous_stable is not None:
                new = current.next(stable=current.previous_stable, previous_stable=current.stable)
            else:
                raise Conflict("nothing to roll back: no canary and no previous stable version", reason="nothing")
            result = self._commit(current, new, action=f"rollback:{reason}", caller=caller)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(reason).inc()
        return result

    # ---- rollout spec -----------------------------------------------------------------------
    def converge(self, spec: RolloutSpec, caller: str = "rollout-file") -> dict[str, Any] | None:
        """Make the served state match ``spec``; returns the commit result, None if already there."""
        with self.shared.lock():
            current = self.shared.read()
            stable = current.stable
            if (stable.checkpoint, stable.merges) != (spec.stable, spec.stable_merges):
                stable = self._timed_materialize("stable", spec.stable, spec.stable_merges, spec.min_match).spec
            canary = None
            if spec.canary:
                sources = ((stable.checkpoint, stable.merges + (spec.canary,)) if spec.canary_mode == "merge"
                           else (spec.canary, spec.canary_merges))
                canary = current.canary
                if canary is None or (canary.checkpoint, canary.merges) != sources:
                    canary = self._timed_materialize("canary", *sources, spec.min_match).spec
            changes = dict(stable=stable, canary=canary, weight=spec.weight if canary else 0,
                           shadow=spec.shadow if canary else 0, revision=spec.revision, rollout_error=None)
            if all(getattr(current, k) == v for k, v in changes.items()):
                return None
            if stable is not current.stable:
                changes["previous_stable"] = current.stable
            return self._commit(current, current.next(**changes), action="converge", caller=caller, write_spec=False)

    def record_rollout_error(self, message: str) -> None:
        with self.shared.lock():
            current = self.shared.read()
            if current.rollout_error != message:
                self.shared.write(current.next(rollout_error=message))
        if self.metrics is not None:
            self.metrics.rollout_errors.inc()

    # ---- committing ---------------------------------------------------------------------------
    def _require_mutable(self) -> None:
        if self.rollout is not None and not self.rollout.writable():
            raise Conflict("the rollout file is read-only (a ConfigMap?): change the served models by editing the "
                           "rollout spec, not through the admin API", reason="read_only_rollout")

    def _commit(self, current: ServingState, new: ServingState, *, action: str, caller: str, slot: str | None = None,
                checkpoint: str | None = None, report: MergeReport | None = None, write_spec: bool = True,
                called: float | None = None) -> dict[str, Any]:
        """Publish ``new``, wait for every worker, roll back on failure. Times from ``called`` (the
        admin call's start, validation included) when given."""
        started = called if called is not None else time.monotonic()
        self.shared.write(new)
        if not self.live:
            return {"result": "ok", "generation": new.generation, "versions": _versions(new), "seconds": 0.0}
        acks = self.shared.wait_for(new.generation, self.workers, self.swap_timeout_s)
        errors = {w: a.error for w, a in acks.items() if a.error}
        missing = self.workers - len(acks)
        if errors or missing > 0:
            restored = replace(current, generation=new.generation + 1)
            self.shared.write(restored)
            self.shared.wait_for(restored.generation, self.workers, self.swap_timeout_s)
            self._count_swap(slot or "stable", "failed")
            self.audit.record(action=action, caller=caller, checkpoint=checkpoint, before=_versions(current),
                              after=_versions(current), result="failed", errors=errors)
            detail = errors or {"timeout": f"{missing} worker(s) did not switch within {self.swap_timeout_s:g} s"}
            raise InternalError(f"{action} failed on some workers and was rolled back: {detail}", reason="swap_failed",
                                details={"workers": detail})
        if self.rollout is not None and write_spec and self.rollout.writable():
            self.rollout.write(spec_of(new))
        elapsed = time.monotonic() - started
        if slot is not None:
            self._count_swap(slot, "ok", elapsed)
        self.audit.record(action=action, caller=caller, checkpoint=checkpoint, before=_versions(current),
                          after=_versions(new), result="ok", merge=report.summary() if report else None)
        log.info("%s by %s: %s -> %s in %.2f s", action, caller, _versions(current), _versions(new), elapsed)
        return {"result": "ok", "generation": new.generation, "versions": _versions(new), "seconds": round(elapsed, 3)}

    def _count_swap(self, slot: str, result: str, seconds: float | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.swaps.labels(slot, result).inc()
        if seconds is not None:
            self.metrics.swap_duration.observe(seconds)


def _versions(state: ServingState) -> dict[str, str | None]:
    return {"stable": state.stable.version, "canary": state.canary.version if state.canary else None}
