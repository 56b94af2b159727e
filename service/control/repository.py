"""Triton's model-repository extension over the served models, for every protocol: index, load, unload.

The index lists every served model (``READY`` once every worker holds it). A load serves
``{name}.safetensors`` (else ``{name}.pt``) from the checkpoint store, or what a ``config`` names
(JSON text ``{"checkpoint", "merges"}``, what tritonclient's ``load_model(name, config=...)`` sends),
as a new model or a new stable version of a served one; an unload stops serving it. The HTTP routes
(``service.http.repository``) and the gRPC calls (``service.grpc.inference``) only translate.
"""

from __future__ import annotations

from service.control.controller import Controller
from service.control.slots import SharedState
from service.control.store import CheckpointStore
from service.errors import NotFound
from service.protocols.admin import RepositoryConfig, check_model_name
from service.protocols.wire import load_object, validate

EVICTED = "evicted (--memory-budget-mb): loaded again on its next request"


class Repository:
    def __init__(self, controller: Controller, shared: SharedState, store: CheckpointStore) -> None:
        self.controller = controller
        self.shared = shared
        self.store = store

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Every served model, the default first: ``name``, ``version`` (its stable one), ``state``
        (READY or UNAVAILABLE) and ``reason``; only the READY ones with ``ready_only``."""
        state = self.shared.read()
        serving, holding = self.shared.held()
        entries = []
        for name in state.names():
            ready = name in serving
            reason = "loading" if not ready else "" if name in holding else EVICTED
            entries.append({"name": name, "version": state.models[name].stable.version,
                            "state": "READY" if ready else "UNAVAILABLE", "reason": reason})
        return [e for e in entries if e["state"] == "READY"] if ready_only else entries

    def load(self, name: str, config: str | None, caller: str) -> None:
        """Serve model ``name`` from the store (``config``: JSON text naming the checkpoint and merges;
        None: ``{name}.safetensors`` or ``{name}.pt``). Blocks until every worker serves it. Raises
        RequestError (a bad name or config, a checkpoint that is not there or cannot be served)."""
        check_model_name(name)
        if config is None:
            checkpoint, merges = self._default_checkpoint(name), ()
        else:
            parsed = validate(RepositoryConfig, load_object(config.encode(), what="parameters.config", reason="body"),
                              where="parameters.config")
            checkpoint, merges = parsed.checkpoint, tuple(parsed.merges)
        self.controller.add_model(name, checkpoint, merges, caller)

    def unload(self, name: str, caller: str) -> None:
        """Stop serving model ``name``. Raises RequestError (NotFound; Conflict for the default model while
        others remain)."""
        check_model_name(name)
        self.controller.remove_model(name, caller)

    def _default_checkpoint(self, name: str) -> str:
        for suffix in (".safetensors", ".pt"):
            if (self.store.root / f"{name}{suffix}").is_file():
                return f"{name}{suffix}"
        raise NotFound(f"no {name}.safetensors or {name}.pt in the checkpoint store: name the checkpoint in "
                       "parameters.config", reason="checkpoint")
