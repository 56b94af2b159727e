"""The checkpoint store: names resolve inside it, or the request is refused without leaking paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.control.store import CheckpointStore
from service.errors import NotFound, RequestError
from service.http.errors import status_of

EMPTY = "checkpoint must be a non-empty path inside the checkpoint store"


@pytest.fixture()
def store(tmp_path: Path) -> CheckpointStore:
    root = tmp_path / "store"
    (root / "heads" / "v3").mkdir(parents=True)
    (root / "base.safetensors").write_bytes(b"base")
    (root / "heads" / "v3" / "head.safetensors").write_bytes(b"head")
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    return CheckpointStore(root)


def _refused(store: CheckpointStore, name: object, error: type[RequestError] = RequestError) -> RequestError:
    with pytest.raises(error) as info:
        store.resolve(name)  # type: ignore[arg-type]
    assert type(info.value) is error
    assert str(store.root) not in str(info.value)
    assert str(store.root.parent) not in str(info.value)
    return info.value


def test_relative_name_resolves_to_the_absolute_file(store: CheckpointStore) -> None:
    assert store.resolve("base.safetensors") == store.root / "base.safetensors"
    assert store.resolve("base.safetensors").read_bytes() == b"base"


def test_nested_name_resolves(store: CheckpointStore) -> None:
    assert store.resolve("heads/v3/head.safetensors") == store.root / "heads" / "v3" / "head.safetensors"


def test_dot_segments_that_stay_inside_are_fine(store: CheckpointStore) -> None:
    assert store.resolve("./heads/./v3/head.safetensors") == store.root / "heads" / "v3" / "head.safetensors"


def test_root_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    (tmp_path / "real" / "a.pt").write_bytes(b"a")
    store = CheckpointStore(tmp_path / "link")
    assert store.root == (tmp_path / "real").resolve()
    assert store.resolve("a.pt") == (tmp_path / "real" / "a.pt").resolve()


@pytest.mark.parametrize("name", ["/etc/passwd", "//etc/passwd"])
def test_absolute_path_is_a_400(store: CheckpointStore, name: str) -> None:
    err = _refused(store, name)
    assert str(err) == (f"checkpoint {name!r} must be a relative path inside the checkpoint store "
                        "(no absolute paths, no '..')")
    assert (status_of(err), err.reason) == (400, "path")


def test_absolute_path_into_the_store_is_still_a_400(store: CheckpointStore) -> None:
    name = str(store.root / "base.safetensors")
    with pytest.raises(RequestError) as info:
        store.resolve(name)
    assert status_of(info.value) == 400
    assert str(info.value) == (f"checkpoint {name!r} must be a relative path inside the checkpoint store "
                               "(no absolute paths, no '..')")


@pytest.mark.parametrize("name", ["../outside.safetensors", "heads/../../outside.safetensors",
                                  "heads/../base.safetensors",
                                  "..", "~/x.pt", "~root/x.pt"])
def test_dotdot_and_home_are_a_400(store: CheckpointStore, name: str) -> None:
    err = _refused(store, name)
    assert str(err) == (f"checkpoint {name!r} must be a relative path inside the checkpoint store "
                        "(no absolute paths, no '..')")
    assert (status_of(err), err.reason) == (400, "path")


@pytest.mark.parametrize("name", ["", "base.safetensors\0", "\0", "a\0/../../etc/passwd"])
def test_empty_or_nul_is_a_400(store: CheckpointStore, name: str) -> None:
    err = _refused(store, name)
    assert str(err) == EMPTY
    assert (status_of(err), err.reason) == (400, "path")


@pytest.mark.parametrize("name", [None, 3, b"base.safetensors", ["base.safetensors"]])
def test_non_string_is_a_400(store: CheckpointStore, name: object) -> None:
    err = _refused(store, name)
    assert str(err) == EMPTY
    assert status_of(err) == 400


def test_symlink_inside_the_store_pointing_inside_is_fine(store: CheckpointStore) -> None:
    os.symlink(store.root / "heads" / "v3" / "head.safetensors", store.root / "latest.safetensors")
    os.symlink("heads/v3", store.root / "current")  # relative directory link
    assert store.resolve("latest.safetensors") == store.root / "heads" / "v3" / "head.safetensors"
    assert store.resolve("current/head.safetensors") == store.root / "heads" / "v3" / "head.safetensors"


def test_symlink_to_a_file_outside_is_a_400(store: CheckpointStore, tmp_path: Path) -> None:
    os.symlink(tmp_path / "outside.safetensors", store.root / "escape.safetensors")
    err = _refused(store, "escape.safetensors")
    assert str(err) == "checkpoint 'escape.safetensors' resolves outside the checkpoint store (symlink)"
    assert (status_of(err), err.reason) == (400, "path")


def test_symlinked_directory_leading_outside_is_a_400(store: CheckpointStore, tmp_path: Path) -> None:
    os.symlink(tmp_path, store.root / "up")
    err = _refused(store, "up/outside.safetensors")
    assert str(err) == "checkpoint 'up/outside.safetensors' resolves outside the checkpoint store (symlink)"


def test_symlink_outside_to_a_missing_target_is_a_400_not_a_404(store: CheckpointStore, tmp_path: Path) -> None:
    # a dangling link must not reveal whether something exists outside
    os.symlink(tmp_path / "nothing-here", store.root / "dangling.safetensors")
    err = _refused(store, "dangling.safetensors")
    assert str(err) == "checkpoint 'dangling.safetensors' resolves outside the checkpoint store (symlink)"


def test_sibling_folder_with_the_store_name_as_prefix_is_outside(store: CheckpointStore, tmp_path: Path) -> None:
    # /x/store-evil starts with the text /x/store but is not inside it
    (tmp_path / "store-evil").mkdir()
    (tmp_path / "store-evil" / "a.pt").write_bytes(b"a")
    os.symlink(tmp_path / "store-evil" / "a.pt", store.root / "a.pt")
    err = _refused(store, "a.pt")
    assert str(err) == "checkpoint 'a.pt' resolves outside the checkpoint store (symlink)"


def test_missing_file_is_a_404(store: CheckpointStore) -> None:
    err = _refused(store, "nope.safetensors", NotFound)
    assert str(err) == "no checkpoint 'nope.safetensors' in the checkpoint store"
    assert (status_of(err), err.reason) == (404, "missing")


@pytest.mark.parametrize("name", ["heads", "heads/v3", ".", "heads/"])
def test_directory_is_a_404(store: CheckpointStore, name: str) -> None:
    err = _refused(store, name, NotFound)
    assert str(err) == f"no checkpoint {name!r} in the checkpoint store"
    assert status_of(err) == 404


def test_dangling_symlink_inside_is_a_404(store: CheckpointStore) -> None:
    os.symlink(store.root / "gone.safetensors", store.root / "link.safetensors")
    err = _refused(store, "link.safetensors", NotFound)
    assert str(err) == "no checkpoint 'link.safetensors' in the checkpoint store"


def test_relative_gives_the_store_name(store: CheckpointStore, tmp_path: Path) -> None:
    assert store.relative(store.root / "heads" / "v3" / "head.safetensors") == "heads/v3/head.safetensors"
    with pytest.raises(ValueError):
        store.relative(tmp_path / "outside.safetensors")


@pytest.mark.parametrize("name", ["a" * 300, "loop.safetensors", "loop.safetensors/x"])
def test_unresolvable_name_is_a_client_error_without_the_path(store: CheckpointStore, name: str) -> None:
    os.symlink("loop.safetensors", store.root / "loop.safetensors")  # a link to itself
    with pytest.raises(RequestError) as info:
        store.resolve(name)
    assert status_of(info.value) in (400, 404)
    assert str(store.root) not in str(info.value)
