"""The admin API's bodies and the rollout spec: one set of field definitions for both.

A slot is loaded from a checkpoint in the store, replaced or merged onto what is served, with a
``min_match`` for merges; the canary has a weight and a shadow share. ``POST /admin/load`` and
``POST /admin/canary`` take those fields as JSON; a rollout spec file (YAML or JSON) declares the
same fields for a whole fleet.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from service.protocols.wire import Wire

Slot = Literal["stable", "canary"]  # the one list of slot names (control.slots.SLOT_NAMES reads it)

Checkpoint = Annotated[str, Field(min_length=1, description="a checkpoint name in the store")]
Mode = Annotated[Literal["replace", "merge"], Field(description="replace or merge")]
Percent = Annotated[int, Field(ge=0, le=100, description="an integer 0-100")]
MinMatch = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False,
                                  description="a number within [0, 1]")]
Merges = Annotated[list[Checkpoint], Field(description="a list of checkpoint names")]


class LoadBody(Wire):
    """POST /admin/load."""

    checkpoint: Checkpoint
    slot: Annotated[Slot, Field(description="stable or canary")] = "stable"
    mode: Mode = "replace"
    min_match: MinMatch = 0.0
    allow_new_classes: Annotated[bool, Field(description="true or false: may a replace change the class count")] = False


class CanaryBody(Wire):
    """POST /admin/canary: what is absent stays as it is."""

    weight: Percent | None = None
    shadow: Percent | None = None


class StableDoc(Wire):
    checkpoint: Checkpoint
    merge: Merges = []
    mode: Annotated[Literal["replace"], Field(description="replace (express merges as stable.merge)")] = "replace"


class CanaryDoc(Wire):
    checkpoint: Checkpoint
    mode: Mode = "replace"
    merge: Merges = []
    weight: Percent = 0
    shadow: Percent = 0
    min_match: MinMatch = 0.0


class RolloutDoc(Wire):
    """A rollout spec file."""

    revision: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v)), Field(description="a label")] = ""
    stable: Annotated[StableDoc, Field(description="a mapping with 'checkpoint'")]
    canary: Annotated[CanaryDoc | None, Field(description="a mapping with 'checkpoint'")] = None
