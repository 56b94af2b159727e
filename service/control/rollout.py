"""The rollout spec: a declarative source of truth for a fleet (JSON or YAML).

```yaml
revision: "2026-12-01.1"
models:                       # every served model by name; the first is the default (POST /predict)
  shapes:
    stable: {checkpoint: demo-v2.safetensors, merge: [head-v2.safetensors]}   # merge: optional chain
    canary: {checkpoint: head-v3.safetensors, mode: merge, weight: 10, shadow: 5}   # optional
  glyphs:
    stable: {checkpoint: glyphs.safetensors}
```
The single-model form (``stable:`` and ``canary:`` at the top, no ``models:``) names the default
model. A canary in ``merge`` mode is the stable weights with the canary's tensors merged on top.
A malformed entry under ``models:`` is refused alone: the others are applied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from service.control.slots import ModelState, ServingState, atomic_write
from service.errors import RequestError
from service.protocols.admin import CanaryDoc, ModelDoc, RolloutDoc, StableDoc
from service.protocols.wire import validate
from service.settings import MODEL_NAME

DEFAULT_MODEL = ""  # the single-model form's entry: the default model, whatever its name


class RolloutSpecError(RequestError):
    """A malformed rollout spec; the server keeps serving what it serves."""


@dataclass(frozen=True)
class ModelSpec:
    """One model's entry: its stable checkpoint (and merges), and an optional canary."""

    stable: str
    stable_merges: tuple[str, ...] = ()
    canary: str | None = None
    canary_mode: str = "replace"
    canary_merges: tuple[str, ...] = ()  # replace mode only: partial checkpoints merged onto ``canary``
    weight: int = 0
    shadow: int = 0
    min_match: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"stable": {"checkpoint": self.stable}}
        if self.stable_merges:
            doc["stable"]["merge"] = list(self.stable_merges)
        if self.canary:
            doc["canary"] = {"checkpoint": self.canary, "mode": self.canary_mode, "weight": self.weight, "shadow": self.shadow}
            if self.canary_merges:
                doc["canary"]["merge"] = list(self.canary_merges)
            if self.min_match:
                doc["canary"]["min_match"] = self.min_match
        return doc


@dataclass(frozen=True)
class RolloutSpec:
    """A parsed spec: the models to serve in order (``DEFAULT_MODEL`` for the single-model form),
    and the entries refused as malformed, by name."""

    revision: str
    models: dict[str, ModelSpec]
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if list(self.models) == [DEFAULT_MODEL]:
            return {"revision": self.revision, **self.models[DEFAULT_MODEL].to_dict()}
        return {"revision": self.revision, "models": {name: spec.to_dict() for name, spec in self.models.items()}}


def parse_spec(text: str, *, where: str = "rollout spec") -> RolloutSpec:
    """Parse and validate a JSON or YAML spec; raises RolloutSpecError saying what is wrong with the
    whole document. A malformed entry under ``models:`` is reported in ``errors`` instead."""
    try:
        doc = yaml.safe_load(text)  # JSON is YAML; safe_load builds plain data only
    except yaml.YAMLError as exc:
        raise RolloutSpecError(f"{where}: not valid YAML/JSON: {str(exc).splitlines()[0]}", reason="rollout") from None
    if not isinstance(doc, dict):
        raise RolloutSpecError(f"{where}: expected a mapping with 'models' or 'stable', found {type(doc).__name__}",
                               reason="rollout")
    parsed = validate(RolloutDoc, doc, where=where, reason="rollout", error=RolloutSpecError)
    if (parsed.models is None) == (parsed.stable is None):
        raise RolloutSpecError(f"{where}: give either 'models' (a mapping of model names) or 'stable' (one model), "
                               "not both or neither", reason="rollout")
    if parsed.models is None:
        return RolloutSpec(parsed.revision, {DEFAULT_MODEL: _model_spec(parsed.stable, parsed.canary, where)})
    models, errors = {}, {}
    for name, entry in parsed.models.items():
        at = f"{where}: models.{name}"
        try:
            if not MODEL_NAME.fullmatch(str(name)):
                raise RolloutSpecError(f"{at}: a model name is 1-64 of A-Z a-z 0-9 _ . -", reason="rollout")
            doc = validate(ModelDoc, entry, where=at, reason="rollout", error=RolloutSpecError)
            models[str(name)] = _model_spec(doc.stable, doc.canary, at)
        except RolloutSpecError as exc:
            errors[str(name)] = str(exc)
    if not models and not errors:
        raise RolloutSpecError(f"{where}: 'models' names no model", reason="rollout")
    return RolloutSpec(parsed.revision, models, errors)


def _model_spec(stable: StableDoc, canary: CanaryDoc | None, where: str) -> ModelSpec:
    spec = ModelSpec(stable=stable.checkpoint, stable_merges=tuple(stable.merge))
    if canary is None:
        return spec
    if canary.merge and canary.mode != "replace":
        raise RolloutSpecError(f"{where}: canary.merge needs mode replace (mode merge builds on stable)", reason="rollout")
    return replace(spec, canary=canary.checkpoint, canary_mode=canary.mode, canary_merges=tuple(canary.merge),
                   weight=canary.weight, shadow=canary.shadow, min_match=canary.min_match)


def spec_of(state: ServingState) -> RolloutSpec:
    """The spec that describes ``state`` (what admin calls write back to a writable rollout file):
    the single-model form while one model is served."""
    revision = state.revision or f"generation-{state.generation}"
    if len(state.models) == 1:
        return RolloutSpec(revision, {DEFAULT_MODEL: model_spec_of(state.model())})
    return RolloutSpec(revision, {name: model_spec_of(state.models[name]) for name in state.names()})  # the default first


def model_spec_of(model: ModelState) -> ModelSpec:
    spec: dict[str, Any] = {"stable": model.stable.checkpoint, "stable_merges": model.stable.merges}
    canary = model.canary
    if canary is not None:
        based_on_stable = canary.checkpoint == model.stable.checkpoint and canary.merges[:-1] == model.stable.merges
        if based_on_stable and canary.merges:
            spec.update(canary=canary.merges[-1], canary_mode="merge")
        else:
            spec.update(canary=canary.checkpoint, canary_mode="replace", canary_merges=canary.merges)
        spec.update(weight=model.weight, shadow=model.shadow)
    return ModelSpec(**spec)


class RolloutFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> RolloutSpec:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RolloutSpecError(f"rollout file unreadable: {type(exc).__name__}", reason="rollout") from None
        return parse_spec(text, where=f"rollout file {self.path.name}")

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def writable(self) -> bool:
        folder = self.path.parent
        return os.access(folder, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK))

    def write(self, spec: RolloutSpec) -> None:
        """Atomically replace the file (same suffix, JSON for .json else YAML)."""
        text = (json.dumps(spec.to_dict(), indent=2) + "\n" if self.path.suffix == ".json"
                else yaml.safe_dump(spec.to_dict(), sort_keys=False))
        atomic_write(self.path, text)
