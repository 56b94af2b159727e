"""GET /models: every served model, its slots and backbone, as a pydantic model (the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from service.protocols.wire import Wire


class SlotVersion(Wire):
    version: str


class Slots(Wire):
    stable: SlotVersion
    canary: SlotVersion | None = None


class CatalogEntry(Wire):
    """One served model: ``backbone`` is its stable version's backbone version (models that share it
    share one backbone pass); ``resident``: every inference worker holds its weights in memory."""

    name: str
    default: bool
    backbone: str
    arch: str
    num_classes: int
    resident: bool
    slots: Slots


class Catalog(Wire):
    models: list[CatalogEntry]


def catalog_body(state: Any, resident: set[str]) -> dict[str, Any]:
    """``Catalog`` of a serving state (its ``models`` and ``default``); ``resident``: the names of the
    models every worker holds. The default model first."""
    entries = []
    for name in state.names():
        model = state.models[name]
        stable = model.stable
        entries.append(CatalogEntry(
            name=name, default=name == state.default, backbone=stable.backbone, arch=stable.meta["arch"],
            num_classes=stable.meta["num_classes"], resident=name in resident,
            slots=Slots(stable=SlotVersion(version=stable.version),
                        canary=SlotVersion(version=model.canary.version) if model.canary else None)))
    return Catalog(models=entries).model_dump()
