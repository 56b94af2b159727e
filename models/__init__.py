"""headswap's transfer-learning library: torchvision classifiers with a replaced head.

Everything the service does to a checkpoint can be reproduced with these functions::

    model, meta = load_classifier("demo.safetensors")
    probs = model(eval_transform(meta)(image).unsqueeze(0)).softmax(-1)

Names are imported on first use (PEP 562): ``import models`` and the torch-free modules
(``models.archs``, ``models.recipe``, ``models.meta``, ``models.summary``) cost milliseconds, so
that ``headswap --help``, ``archs`` and ``inspect`` start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ARCHS", "ArchSpec", "get_spec"), "models.archs"),
    **dict.fromkeys((
        "build_classifier", "classifier_from_state", "count_parameters", "head_parameter_names",
        "load_classifier", "merge_checkpoint_into", "recorded_arch_kwargs", "skeleton",
    ), "models.build"),
    "CheckpointMeta": "models.meta",
    **dict.fromkeys(("LoadedCheckpoint", "load_checkpoint", "save_checkpoint", "state_version"), "models.checkpoint"),
    **dict.fromkeys((
        "CheckpointError", "IncompatibleCheckpointError", "UnknownArchitectureError", "UnsafeCheckpointError",
        "WeightsUnavailableError",
    ), "models.errors"),
    **dict.fromkeys(("MergeReport", "ShapeMismatch"), "models.merge_report"),
    "merge_state": "models.merge",
    **dict.fromkeys(("apply_policy", "set_train_mode"), "models.policy"),
    **dict.fromkeys(("eval_transform", "train_transform"), "models.transforms"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from models.archs import ARCHS, ArchSpec, get_spec
    from models.build import (
        build_classifier,
        classifier_from_state,
        count_parameters,
        head_parameter_names,
        load_classifier,
        merge_checkpoint_into,
        recorded_arch_kwargs,
        skeleton,
    )
    from models.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint, state_version
    from models.errors import (
        CheckpointError,
        IncompatibleCheckpointError,
        UnknownArchitectureError,
        UnsafeCheckpointError,
        WeightsUnavailableError,
    )
    from models.merge import merge_state
    from models.merge_report import MergeReport, ShapeMismatch
    from models.meta import CheckpointMeta
    from models.policy import apply_policy, set_train_mode
    from models.transforms import eval_transform, train_transform
