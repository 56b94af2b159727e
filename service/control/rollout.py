"""The rollout spec: a declarative source of truth for a fleet (JSON or YAML).

```yaml
revision: "2026-12-01.1"
stable: {checkpoint: demo-v2.safetensors, merge: [head-v2.safetensors]}   # merge: optional chain
canary: {checkpoint: head-v3.safetensors, mode: merge, weight: 10, shadow: 5}   # optional
```
A canary in ``merge`` mode is the stable weights with the canary's tensors merged on top.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from service.control.slots import ServingState, atomic_write
from service.errors import RequestError
from service.protocols.admin import RolloutDoc
from service.protocols.wire import validate

class RolloutSpecError(RequestError):
    """A malformed rollout spec; the server keeps serving what it serves."""


@dataclass(frozen=True)
class RolloutSpec:
    revision: str
    stable: str
    stable_merges: tuple[str, ...] = ()
    canary: str | None = None
    canary_mode: str = "replace"
    canary_merges: tuple[str, ...] = ()  # replace mode only: partial checkpoints merged onto ``canary``
    weight: int = 0
    shadow: int = 0
    min_match: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"revision": self.revision, "stable": {"checkpoint": self.stable}}
        if self.stable_merges:
            doc["stable"]["merge"] = list(self.stable_merges)
        if self.canary:
            doc["canary"] = {"checkpoint": self.canary, "mode": self.canary_mode, "weight": self.weight, "shadow": self.shadow}
            if self.canary_merges:
                doc["canary"]["merge"] = list(self.canary_merges)
            if self.min_match:
                doc["canary"]["min_match"] = self.min_match
        return doc


def parse_spec(text: str, *, where: str = "rollout spec") -> RolloutSpec:
    """Parse and validate a JSON or YAML spec; raises RolloutSpecError saying what is wrong."""
    try:
        doc = yaml.safe_load(text)  # JSON is YAML; safe_load builds plain data only
    except yaml.YAMLError as exc:
        raise RolloutSpecError(f"{where}: not valid YAML/JSON: {str(exc).splitlines()[0]}", reason="rollout") from None
    if not isinstance(doc, dict):
        raise RolloutSpecError(f"{where}: expected a mapping with 'stable', found {type(doc).__name__}", reason="rollout")
    parsed = validate(RolloutDoc, doc, where=where, reason="rollout", error=RolloutSpecError)
    spec = RolloutSpec(revision=parsed.revision, stable=parsed.stable.checkpoint, stable_merges=tuple(parsed.stable.merge))
    canary = parsed.canary
    if canary is None:
        return spec
    if canary.merge and canary.mode != "replace":
        raise RolloutSpecError(f"{where}: canary.merge needs mode replace (mode merge builds on stable)", reason="rollout")
    return replace(spec, canary=canary.checkpoint, canary_mode=canary.mode, canary_merges=tuple(canary.merge),
                   weight=canary.weight, shadow=canary.shadow, min_match=canary.min_match)


def spec_of(state: ServingState) -> RolloutSpec:
    """The spec that describes ``state`` (what admin calls write back to a writable rollout file)."""
    spec: dict[str, Any] = {"revision": state.revision or f"generation-{state.generation}",
                            "stable": state.stable.checkpoint, "stable_merges": state.stable.merges}
    canary = state.canary
    if canary is not None:
        based_on_stable = canary.checkpoint == state.stable.checkpoint and canary.merges[:-1] == state.stable.merges
        if based_on_stable and canary.merges:
            spec.update(canary=canary.merges[-1], canary_mode="merge")
        else:
            spec.update(canary=canary.checkpoint, canary_mode="replace", canary_merges=canary.merges)
        spec.update(weight=state.weight, shadow=state.shadow)
    return RolloutSpec(**spec)


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
