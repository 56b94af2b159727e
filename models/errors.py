"""Typed errors of the models library.

Every error says what was expected and what was found, and carries its data so
callers (the CLI, the service) can report it without parsing the message.
"""

from __future__ import annotations

import difflib

from models.merge_report import MergeReport


class UnknownArchitectureError(ValueError):
    """The architecture name is not in the architecture table."""

    def __init__(self, arch: str, known: list[str]) -> None:
        self.arch = arch
        self.known = known
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" (did you mean: {', '.join(close)}?)" if close else ""
        super().__init__(
            f"unknown architecture {arch!r}: expected one of the {len(known)} torchvision "
            f"classifiers listed by `headswap archs`{hint}"
        )


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, is corrupt, or lacks what the caller needs."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnsafeCheckpointError(CheckpointError):
    """The file holds pickled Python objects; loading it would run code from the file."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            path,
            "refused to unpickle: the file holds Python objects, not only tensors "
            f"({detail}). A whole model saved with torch.save(model, PATH) runs code when loaded. "
            f"If you trust its author, convert it once with "
            f"`headswap convert {path} --out NEW.safetensors --trust-pickle`",
        )


class IncompatibleCheckpointError(ValueError):
    """A state does not fit the target model; carries the merge report that shows why."""

    def __init__(self, message: str, report: MergeReport) -> None:
        self.report = report
        super().__init__(message)


class WeightsUnavailableError(RuntimeError):
    """torchvision pretrained weights could not be obtained (offline, unknown name)."""

    def __init__(self, arch: str, weights: str, reason: str) -> None:
        self.arch = arch
        self.weights = weights
        super().__init__(f"weights {weights!r} for {arch}: {reason}")
