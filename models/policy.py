"""The seed's two fine-tuning set-ups, for every architecture.

* ``"head"``: "only update the fully connected layer" -- ``optim.SGD(model.fc.parameters(),
  lr=0.001, momentum=0.9)`` in the seed, generalised to each architecture's head(s). The
  backbone gets ``requires_grad=False`` and stays in eval mode (BatchNorm statistics and
  dropout frozen), so its tensors are bit-identical after training.
* ``"all"``: "update all parameters".
"""

from __future__ import annotations

from torch import nn

from models.archs import get_spec
from models.recipe import POLICIES, TrainPolicy

__all__ = ["POLICIES", "TrainPolicy", "apply_policy", "head_modules", "set_train_mode"]


def _check(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"train policy must be one of {', '.join(POLICIES)}, found {policy!r}")


def head_modules(arch: str, model: nn.Module) -> list[nn.Module]:
    """The head and auxiliary heads of ``model``, as modules."""
    return [model.get_submodule(path) for path in get_spec(arch).head_modules]


def apply_policy(arch: str, model: nn.Module, policy: TrainPolicy) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``policy`` and return the parameters to optimise."""
    _check(policy)
    if policy == "all":
        model.requires_grad_(True)
        return list(model.parameters())
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for head in head_modules(arch, model):
        head.requires_grad_(True)
        params.extend(head.parameters())
    return params


def set_train_mode(arch: str, model: nn.Module, policy: TrainPolicy) -> nn.Module:
    """``model.train()`` for ``policy``: with ``"head"`` only the heads train; returns ``model``."""
    _check(policy)
    if policy == "all":
        return model.train()
    model.eval()
    for head in head_modules(arch, model):
        head.train()
    return model
