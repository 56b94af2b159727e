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
    CheckpointMeta,
    IncompatibleCheckpointError,
    load_checkpoint,
    merge_state,
    save_checkpoint,
    state_version,
)
from models.checkpoint import utc_now
from models.merge import MergeReport
from models.shared import backbone_state, backbone_version
from service.control.audit import AuditLog
from service.control.memory import release_freed_memory
from service.control.rollout import DEFAULT_MODEL, ModelSpec, RolloutFile, RolloutSpec, spec_of
from service.control.slots import ModelState, ServingState, SharedState, SlotSpec
from service.control.store import CheckpointStore
from service.errors import Conflict, InternalError, RequestError, Unprocessable
from service.observability.metrics import Metrics
from service.protocols.admin import check_model_name

log = logging.getLogger("headswap.controller")


@dataclass(frozen=True)
class LoadRequest:
    checkpoint: str
    slot: str = "stable"
    mode: str = "replace"
    min_match: float = 0.0
    allow_new_classes: bool = False
    model: str | None = None  # None: the default model


@dataclass
class Candidate:
    spec: SlotSpec
    report: MergeReport | None


# Builds a candidate as the workers will run it and warms it up; raises IncompatibleCheckpointError
# (the state does not fit its architecture) or ValueError (a bad warm-up). The inference engine's.
Validator = Callable[[dict[str, torch.Tensor], Any, str, str], None]


class Controller:
    def __init__(self, shared: SharedState, store: CheckpointStore, workers: int, *, audit: AuditLog, validate: Validator,
                 rollout: RolloutFile | None = None, metrics: Metrics | None = None, swap_timeout_s: float = 120.0,
                 memory_budget_bytes: int = 0) -> None:
        self.shared = shared
        self.store = store
        self.workers = workers
        self.audit = audit
        self.validate = validate
        self.rollout = rollout
        self.metrics = metrics
        self.swap_timeout_s = swap_timeout_s
        self.memory_budget_bytes = memory_budget_bytes
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
                if part.meta.arch != meta.arch:
                    raise Conflict(f"{name!r} is {part.meta.arch}; a merge needs {meta.arch}", reason="incompatible")
                if part.meta.num_classes != meta.num_classes:
                    state, meta = _with_new_head(name, state, meta, part.state, part.meta)
                state, report = merge_state(state, part.state, min_match=min_match)
                meta = replace(meta, parent_version=state_version(base.state))
        except IncompatibleCheckpointError as exc:
            raise Unprocessable(str(exc), reason="merge", details={"report": exc.report.to_dict()}) from None
        except CheckpointError as exc:
            name = Path(exc.path).name  # never show the server's paths: name files as the store does
            raise Unprocessable(f"checkpoint {name!r}: {exc.reason.replace(exc.path, name)}", reason="unreadable") from None
        version = state_version(state)
        size = sum(t.numel() * t.element_size() for t in state.values())
        if self.memory_budget_bytes and size > self.memory_budget_bytes:
            raise Unprocessable(f"{checkpoint!r} needs {size / 2**20:.1f} MiB of weights, over each worker's "
                                f"--memory-budget-mb {self.memory_budget_bytes / 2**20:g}", reason="memory_budget")
        backbone = backbone_version(meta.arch, state)
        self._validate_weights(state, meta, version, backbone)
        blob = self.shared.blob(version)
        if not blob.exists():
            save_checkpoint(blob, state, meta)
        spec = SlotSpec(checkpoint=checkpoint, merges=tuple(merges), version=version, meta=meta.to_dict(),
                        loaded_at=utc_now(), merge_report=report.summary() if report else None, backbone=backbone)
        return Candidate(spec, report)

    def _validate_weights(self, state: dict[str, torch.Tensor], meta: Any, version: str, backbone: str) -> None:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise Unprocessable(f"tensors with NaN or Inf: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
                                reason="non_finite")
        try:
            self.validate(state, meta, version, backbone)
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
            name = current.name_of(req.model)
            model = current.model(name)
            candidate = self._candidate(req, model)
            change = {req.slot: candidate.spec}
            if req.slot == "stable":
                change["previous_stable"] = model.stable
            new = current.with_model(name, replace(model, **change))
            result = self._commit(current, new, name, action="load", caller=caller, slot=req.slot,
                                  checkpoint=req.checkpoint, report=candidate.report, called=called)
        return {**result, "merge_report": candidate.report.to_dict() if candidate.report else None}

    def add_model(self, name: str, checkpoint: str, merges: tuple[str, ...], caller: str) -> dict[str, Any]:
        """Serve ``checkpoint`` (with ``merges``) as model ``name``: a new model, or a new stable
        version of a served one (validated as ``load`` does, class count free). Raises RequestError."""
        called = time.monotonic()
        check_model_name(name)
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            candidate = self._timed_materialize("stable", checkpoint, merges, 0.0)
            model = current.models.get(name)
            if model is None:
                new = current.with_model(name, ModelState(stable=candidate.spec))
            else:
                got, want = candidate.spec.meta, model.stable.meta
                if (got["arch"], got["num_classes"]) != (want["arch"], want["num_classes"]):
                    self._reject("stable", checkpoint, Conflict(
                        f"{got['arch']} with {got['num_classes']} classes does not match model {name!r}'s {want['arch']} "
                        f"with {want['num_classes']}: unload it first to serve another kind of model under its name",
                        reason="arch" if got["arch"] != want["arch"] else "classes"), merges)
                new = current.with_model(name, replace(model, stable=candidate.spec, previous_stable=model.stable))
            return self._commit(current, new, name, action="repository_load", caller=caller, slot="stable",
                                checkpoint=checkpoint, report=candidate.report, called=called)

    def remove_model(self, name: str, caller: str) -> dict[str, Any]:
        """Stop serving model ``name``. Raises NotFound, or Conflict for the default model while others remain."""
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            current.name_of(name)
            if name == current.default:
                raise Conflict(f"{name!r} is the default model (POST /predict): unload the other models first, "
                               f"or load another model under its name", reason="default_model")
            return self._commit(current, current.with_model(name, None), name, action="unload", caller=caller)

    def _candidate(self, req: LoadRequest, current: ModelState) -> Candidate:
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

    def set_canary(self, weight: int | None, shadow: int | None, caller: str, model: str | None = None) -> dict[str, Any]:
        """Set model ``model``'s canary weight and shadow share (None: unchanged)."""
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            name = current.name_of(model)
            served = current.model(name)
            weight = served.weight if weight is None else weight
            shadow = served.shadow if shadow is None else shadow
            if served.canary is None and (weight or shadow):
                raise Conflict("no canary loaded: POST /admin/load with slot 'canary' first", reason="no_canary")
            new = current.with_model(name, replace(served, weight=weight, shadow=shadow))
            return self._commit(current, new, name, action="canary", caller=caller)

    def promote(self, caller: str, model: str | None = None) -> dict[str, Any]:
        with self.shared.lock():
            current = self.shared.read()
            self._require_mutable()
            name = current.name_of(model)
            served = current.model(name)
            if served.canary is None:
                raise Conflict("no canary to promote", reason="no_canary")
            new = current.with_model(name, replace(served, stable=served.canary, canary=None, weight=0, shadow=0,
                                                   previous_stable=served.stable))
            return self._commit(current, new, name, action="promote", caller=caller, slot="stable")

    def rollback(self, caller: str, reason: str = "manual", model: str | None = None) -> dict[str, Any]:
        with self.shared.lock():
            current = self.shared.read()
            if reason == "manual":
                self._require_mutable()
            name = current.name_of(model)
            served = current.model(name)
            if served.canary is not None:
                changed = replace(served, canary=None, weight=0, shadow=0)
            elif reason == "manual" and served.previous_stable is not None:
                changed = replace(served, stable=served.previous_stable, previous_stable=served.stable)
            else:
                raise Conflict("nothing to roll back: no canary and no previous stable version", reason="nothing")
            result = self._commit(current, current.with_model(name, changed), name, action=f"rollback:{reason}", caller=caller)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(reason).inc()
        return result

    # ---- rollout spec -----------------------------------------------------------------------
    def converge(self, spec: RolloutSpec, caller: str = "rollout-file") -> dict[str, Any] | None:
        """Make the served models match ``spec``: add, change and remove models; returns the commit
        result, None if already there. An entry that is malformed or cannot be served is refused alone
        (a served model keeps its weights; the error is on it and in ``rollout_error``). Raises
        RequestError when no entry can be served."""
        with self.shared.lock():
            current = self.shared.read()
            models: dict[str, ModelState] = {}
            errors = dict(spec.errors)
            for key, entry in spec.models.items():
                name = current.default if key == DEFAULT_MODEL else key
                try:
                    models[name] = self._converged(current.models.get(name), entry)
                except RequestError as exc:
                    errors[name] = str(exc)
            for name, error in errors.items():
                if name in current.models:
                    models[name] = replace(current.models[name], rollout_error=error)
            if not models:
                raise Unprocessable(f"no model of the rollout spec can be served: {_joined(errors)}", reason="rollout")
            default = current.default if DEFAULT_MODEL in spec.models else next(iter(spec.models), current.default)
            if default not in models:
                default = next(iter(models))
            # the revision names the last spec applied in full
            changes = {"models": models, "default": default, "revision": current.revision if errors else spec.revision,
                       "rollout_error": f"rollout spec entries refused: {_joined(errors)}" if errors else None}
            if errors and self.metrics is not None and changes["rollout_error"] != current.rollout_error:
                self.metrics.rollout_errors.inc()
            if all(getattr(current, k) == v for k, v in changes.items()):
                return None
            return self._commit(current, current.next(**changes), default, action="converge", caller=caller,
                                write_spec=False)

    def _converged(self, served: ModelState | None, spec: ModelSpec) -> ModelState:
        """``served`` (None: not served yet) changed to match ``spec``; unchanged slots keep their weights."""
        stable = served.stable if served is not None else None
        if stable is None or (stable.checkpoint, stable.merges) != (spec.stable, spec.stable_merges):
            stable = self._timed_materialize("stable", spec.stable, spec.stable_merges, spec.min_match).spec
        canary = None
        if spec.canary:
            sources = ((stable.checkpoint, stable.merges + (spec.canary,)) if spec.canary_mode == "merge"
                       else (spec.canary, spec.canary_merges))
            canary = served.canary if served is not None else None
            if canary is None or (canary.checkpoint, canary.merges) != sources:
                canary = self._timed_materialize("canary", *sources, spec.min_match).spec
        model = ModelState(stable=stable, canary=canary, weight=spec.weight if canary else 0,
                           shadow=spec.shadow if canary else 0)
        if served is None:
            return model
        previous = served.stable if stable is not served.stable else served.previous_stable
        return replace(model, previous_stable=previous)

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

    def _commit(self, current: ServingState, new: ServingState, model: str, *, action: str, caller: str, slot: str | None = None,
                checkpoint: str | None = None, report: MergeReport | None = None, write_spec: bool = True,
                called: float | None = None) -> dict[str, Any]:
        """Publish ``new``, wait for every worker, roll back on failure. Times from ``called`` (the
        admin call's start, validation included) when given. The result names ``model`` and its versions."""
        started = called if called is not None else time.monotonic()
        self.shared.write(new)
        if not self.live:
            return {"result": "ok", "model": model, "generation": new.generation, "versions": _versions(new, model),
                    "seconds": 0.0}
        acks = self.shared.wait_for(new.generation, self.workers, self.swap_timeout_s)
        errors = {w: a.error for w, a in acks.items() if a.error}
        missing = self.workers - len(acks)
        if errors or missing > 0:
            restored = replace(current, generation=new.generation + 1)
            self.shared.write(restored)
            self.shared.wait_for(restored.generation, self.workers, self.swap_timeout_s)
            self._count_swap(slot or "stable", "failed")
            self.audit.record(action=action, caller=caller, checkpoint=checkpoint, model=model, before=_versions(current, model),
                              after=_versions(current, model), result="failed", errors=errors)
            detail = errors or {"timeout": f"{missing} worker(s) did not switch within {self.swap_timeout_s:g} s"}
            raise InternalError(f"{action} failed on some workers and was rolled back: {detail}", reason="swap_failed",
                                details={"workers": detail})
        if self.rollout is not None and write_spec and self.rollout.writable():
            self.rollout.write(spec_of(new))
        elapsed = time.monotonic() - started
        if slot is not None:
            self._count_swap(slot, "ok", elapsed)
        self.audit.record(action=action, caller=caller, checkpoint=checkpoint, model=model, before=_versions(current, model),
                          after=_versions(new, model), result="ok", merge=report.summary() if report else None)
        log.info("%s of %s by %s: %s -> %s in %.2f s", action, model, caller, _versions(current, model),
                 _versions(new, model), elapsed)
        return {"result": "ok", "model": model, "generation": new.generation, "versions": _versions(new, model),
                "seconds": round(elapsed, 3)}

    def _count_swap(self, slot: str, result: str, seconds: float | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.swaps.labels(slot, result).inc()
        if seconds is not None:
            self.metrics.swap_duration.observe(seconds)


def _with_new_head(name: str, state: dict[str, torch.Tensor], meta: CheckpointMeta, head: dict[str, torch.Tensor],
                   head_meta: CheckpointMeta) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """``state`` with the head tensors of ``head`` (a head-only checkpoint of other classes) in place of
    its own, and the head's classes: a head-only fine-tune served as its backbone plus its head. Raises
    Conflict when ``head`` holds tensors outside the head."""
    outside = sorted(backbone_state(meta.arch, head))
    if outside:
        raise Conflict(f"{name!r} has {head_meta.num_classes} classes where the model has {meta.num_classes}, and "
                       f"tensors outside the head ({', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}): only a "
                       "head-only checkpoint (slice --head) may bring its own classes to a merge", reason="incompatible")
    return {**backbone_state(meta.arch, state), **head}, replace(meta, num_classes=head_meta.num_classes, class_names=head_meta.class_names)


def _versions(state: ServingState, model: str) -> dict[str, str | None]:
    served = state.models.get(model)
    if served is None:
        return {"stable": None, "canary": None}
    return {"stable": served.stable.version, "canary": served.canary.version if served.canary else None}


def _joined(errors: dict[str, str]) -> str:
    return "; ".join(f"{name or 'the default model'}: {error}" for name, error in errors.items())
