"""headswap's transfer-learning library: torchvision classifiers with a replaced head.

Everything the service does to a checkpoint can be reproduced with these functions::

    model, meta = load_classifier("demo.safetensors")
    probs = model(eval_transform(meta)(image).unsqueeze(0)).softmax(-1)
"""

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
from models.checkpoint import CheckpointMeta, LoadedCheckpoint, load_checkpoint, save_checkpoint, state_version
from models.errors import (
    CheckpointError,
    IncompatibleCheckpointError,
    UnknownArchitectureError,
    UnsafeCheckpointError,
    WeightsUnavailableError,
)
from models.merge import MergeReport, ShapeMismatch, merge_state
from models.policy import apply_policy, set_train_mode
from models.transforms import eval_transform, train_transform

__all__ = [
    "ARCHS", "ArchSpec", "CheckpointError", "CheckpointMeta", "IncompatibleCheckpointError",
    "LoadedCheckpoint", "MergeReport", "ShapeMismatch", "UnknownArchitectureError",
    "UnsafeCheckpointError", "WeightsUnavailableError", "apply_policy", "build_classifier",
    "classifier_from_state", "count_parameters", "eval_transform", "get_spec",
    "head_parameter_names", "load_checkpoint", "load_classifier", "merge_checkpoint_into",
    "merge_state", "recorded_arch_kwargs", "save_checkpoint", "set_train_mode", "skeleton", "state_version",
    "train_transform",
]
