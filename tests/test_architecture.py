"""The import rules of docs/architecture.md, read from the source (every import, also those inside
functions and under TYPE_CHECKING): models never imports service; the service's sub-packages
depend on each other one way only; nothing but the ``serve`` verb imports the composition root."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# service sub-package -> the sub-packages it may import (besides itself and the shared top-level
# modules service.errors and service.settings). Leaves first; the order is the only direction.
MAY_IMPORT = {
    "protocols": set(),
    "observability": set(),
    "control": {"observability", "protocols"},
    "inference": {"control", "observability", "protocols"},
    "http": {"inference", "control", "observability", "protocols"},
    "grpc": {"inference", "control", "observability", "protocols"},  # beside http: neither imports the other
}
SHARED = {"service.errors", "service.settings"}
ROOT_MODULE = "service.server"
RUNS_THE_ROOT = {"service.serve_commands"}  # the `serve` verb: imports the composition root to run it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from pkg import mod`` counts as pkg.mod)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def sub_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "service" and len(parts) > 2 and parts[1] in MAY_IMPORT else None


def test_the_rules_see_every_sub_package_and_real_imports() -> None:
    """The rules cover the folders that exist, and the reader finds imports (a rule over nothing passes)."""
    on_disk = {p.parent.name for p in (ROOT / "service").glob("*/__init__.py")}
    assert on_disk == set(MAY_IMPORT)
    assert "service.inference.dispatch" in imports(ROOT / "service" / "inference" / "dataplane.py")


@pytest.mark.parametrize("path", sources("models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_models_never_imports_service(path: Path) -> None:
    """models/ (its CLI verbs in models/commands/ too) is usable without the service or the benchmarks."""
    assert not {m for m in imports(path) if m.split(".")[0] in ("service", "bench")}


@pytest.mark.parametrize("path", sources("service"), ids=lambda p: str(p.relative_to(ROOT)))
def test_service_sub_packages_depend_one_way(path: Path) -> None:
    here = sub_package(module_name(path))
    if here is None:
        return
    allowed = MAY_IMPORT[here] | {here}
    wrong = {m for m in imports(path) if (other := sub_package(m)) is not None and other not in allowed}
    assert not wrong, f"{module_name(path)} ({here}) may import only {sorted(allowed)} among the sub-packages"


@pytest.mark.parametrize("path", sources("service") + sources("models") + sources("tests"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_composition_root(path: Path) -> None:
    if module_name(path) in RUNS_THE_ROOT | {ROOT_MODULE}:
        return
    assert ROOT_MODULE not in imports(path)


def test_only_the_serve_verb_runs_the_composition_root() -> None:
    assert all(ROOT_MODULE in imports(ROOT / (m.replace(".", "/") + ".py")) for m in RUNS_THE_ROOT)


@pytest.mark.parametrize("module", sorted(SHARED))
def test_shared_modules_import_no_sub_package(module: str) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    assert not {m for m in imports(path) if sub_package(m) is not None or m == ROOT_MODULE}
