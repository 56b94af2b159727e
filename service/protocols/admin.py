"""The admin API's bodies and the rollout spec: one set of field definitions for both.

A slot is loaded from a checkpoint in the store, replaced or merged onto what is served, with a
``min_match`` for merges; the canary has a weight and a shadow share. ``POST /admin/load`` and
``POST /admin/canary`` take those fields as JSON; a rollout spec file (YAML or JSON) declares the
same fields for a whole fleet.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from service.errors import RequestError, Unauthorized
from service.protocols.wire import Wire
from service.settings import MODEL_NAME

Slot = Literal["stable", "canary"]  # the one list of slot names (control.slots.SLOT_NAMES reads it)


Checkpoint = Annotated[str, Field(min_length=1, description="a checkpoint name in the store")]
Mode = Annotated[Literal["replace", "merge"], Field(description="replace or merge")]
Percent = Annotated[int, Field(ge=0, le=100, description="an integer 0-100")]
MinMatch = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False,
                                  description="a number within [0, 1]")]
Merges = Annotated[list[Checkpoint], Field(description="a list of checkpoint names")]
ModelName = Annotated[str, Field(pattern=f"^{MODEL_NAME.pattern}$",
                                 description="a served model's name (1-64 of A-Z a-z 0-9 _ . -)")]


def check_model_name(name: str) -> None:
    """Raises RequestError (400) unless ``name`` is a possible model name."""
    if not MODEL_NAME.fullmatch(name):
        raise RequestError(f"a model name is 1-64 of A-Z a-z 0-9 _ . -, found {name[:80]!r}", reason="model_name")


def check_bearer(authorization: str, token: str) -> None:
    """An ``Authorization`` value (HTTP header or gRPC metadata) must be ``Bearer <token>``; compared in
    constant time. Raises Unauthorized."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("missing or wrong admin token: send Authorization: Bearer <token>", reason="auth")


def token_id(token: str) -> str:
    """How the audit log names a caller: a short hash of its token, never the token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]


class LoadBody(Wire):
    """POST /admin/load."""

    checkpoint: Checkpoint
    slot: Annotated[Slot, Field(description="stable or canary")] = "stable"
    mode: Mode = "replace"
    min_match: MinMatch = 0.0
    allow_new_classes: Annotated[bool, Field(description="true or false: may a replace change the class count")] = False
    model: ModelName | None = None


class ModelBody(Wire):
    """POST /admin/promote and /admin/rollback: which model (absent: the default one)."""

    model: ModelName | None = None


class CanaryBody(Wire):
    """POST /admin/canary: what is absent stays as it is."""

    weight: Percent | None = None
    shadow: Percent | None = None
    model: ModelName | None = None


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


class ModelDoc(Wire):
    """One model's entry in a rollout spec."""

    stable: Annotated[StableDoc, Field(description="a mapping with 'checkpoint'")]
    canary: Annotated[CanaryDoc | None, Field(description="a mapping with 'checkpoint'")] = None


class RolloutDoc(Wire):
    """A rollout spec file: ``models`` by name, or one model's ``stable`` and ``canary``. Each entry of
    ``models`` is validated on its own (a malformed one is refused alone)."""

    revision: Annotated[str, BeforeValidator(lambda v: "" if v is None else str(v)), Field(description="a label")] = ""
    models: Annotated[dict[str, Any] | None, Field(description="a mapping of model names to entries with 'stable'")] = None
    stable: Annotated[StableDoc | None, Field(description="a mapping with 'checkpoint'")] = None
    canary: Annotated[CanaryDoc | None, Field(description="a mapping with 'checkpoint'")] = None


class RepositoryIndexBody(Wire):
    """POST /v2/repository/index (Triton's model-repository extension)."""

    ready: Annotated[bool | None, Field(description="true: only the models ready to answer")] = None


class RepositoryParameters(Wire):
    config: Annotated[str, Field(description="JSON text: {\"checkpoint\": <store path>, \"merges\": [<store path>, ...]}")]


class RepositoryLoadBody(Wire):
    """POST /v2/repository/models/{name}/load: no parameters loads {name}.safetensors (else {name}.pt)."""

    parameters: Annotated[RepositoryParameters | None, Field(description="a mapping with 'config'")] = None


class RepositoryConfig(Wire):
    """The ``config`` of a repository load: the base checkpoint and the partial ones merged on top."""

    checkpoint: Checkpoint
    merges: Merges = Field(default_factory=list)
