"""The checkpoint store: every path an admin call or a rollout spec names must resolve inside it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from service.errors import NotFound, RequestError


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def resolve(self, name: str) -> Path:
        """``name`` (relative, inside the store) -> absolute path of an existing file.

        Raises RequestError (400) for absolute paths, ``..``, or symlinks that leave the store;
        NotFound (404) when no such file exists. Error messages name the path as given, never
        the server's file system layout.
        """
        if not isinstance(name, str) or not name or "\0" in name:
            raise RequestError("checkpoint must be a non-empty path inside the checkpoint store", reason="path")
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
            raise RequestError(f"checkpoint {name!r} must be a relative path inside the checkpoint store "
                               "(no absolute paths, no '..')", reason="path")
        try:
            resolved = (self.root / pure).resolve()
            inside = resolved.is_relative_to(self.root)
            is_file = inside and resolved.is_file()
        except (OSError, RuntimeError) as exc:  # name too long, symlink loop: their messages name our paths
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "symlink loop"
            raise RequestError(f"checkpoint {name!r} cannot be resolved in the checkpoint store ({why})",
                               reason="path") from None
        if not inside:
            raise RequestError(f"checkpoint {name!r} resolves outside the checkpoint store (symlink)", reason="path")
        if not is_file:
            raise NotFound(f"no checkpoint {name!r} in the checkpoint store", reason="missing")
        return resolved

    def relative(self, path: Path) -> str:
        """The store-relative name of ``path``; raises ValueError when it is outside."""
        return str(path.resolve().relative_to(self.root))
