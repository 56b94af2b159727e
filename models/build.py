"""Build torchvision classifiers with a replaced head, and rebuild them from checkpoints."""

from __future__ import annotations

import logging
import os
import urllib.error
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from models.archs import get_spec
from models.checkpoint import CheckpointMeta, load_checkpoint
from models.errors import CheckpointError, IncompatibleCheckpointError, WeightsUnavailableError
from models.merge import MergeReport, format_report, merge_state

log = logging.getLogger(__name__)

# googlenet and inception_v3 always keep their auxiliary heads, so that every checkpoint
# of one architecture has the same keys whether or not it started from torchvision weights.
_FIXED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": True, "init_weights": True},
    "inception_v3": {"aux_logits": True, "init_weights": True},
}
# Constructor arguments that torchvision's weights change and that a checkpoint must record.
_RECORDED_KWARGS: dict[str, tuple[str, ...]] = {
    "googlenet": ("transform_input",),
    "inception_v3": ("transform_input",),
    **{arch: ("image_size",) for arch in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")},
}


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    weights: str | os.PathLike[str] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build ``arch`` with fresh head(s) of ``num_classes`` outputs.

    ``weights``: None (random init); a torchvision weights name such as ``"DEFAULT"`` or
    ``"IMAGENET1K_V1"`` (loaded through torchvision's weights API, then the head replaced);
    or a checkpoint path, merged partially (matching names and shapes; the report is logged).
    ``arch_kwargs`` are recorded constructor arguments from checkpoint metadata.
    Raises UnknownArchitectureError, WeightsUnavailableError, CheckpointError.
    """
    spec = get_spec(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, found {num_classes}")
    is_path = weights is not None and (isinstance(weights, os.PathLike) or Path(str(weights)).suffix in (".safetensors", ".pt", ".pth"))
    model = _torchvision_model(arch, None if is_path else weights, arch_kwargs or {})
    for head in spec.head_modules:
        model.set_submodule(head, _fresh_head(model.get_submodule(head), num_classes))
    if is_path:
        report = merge_checkpoint_into(model, weights, skip_heads_of=arch)
        log.info("merged %s into %s:\n%s", weights, arch, format_report(report))
    return model


def merge_checkpoint_into(
    model: nn.Module, path: str | os.PathLike[str], *, min_match: float = 0.0, skip_heads_of: str | None = None
) -> MergeReport:
    """Merge the tensors of the checkpoint at ``path`` that fit ``model`` (in place).

    ``skip_heads_of``: an architecture whose head tensors are left out of the source, so the
    model keeps fresh heads even where the shapes fit. Returns the merge report; raises
    CheckpointError or IncompatibleCheckpointError.
    """
    loaded = load_checkpoint(path)
    if skip_heads_of is not None:
        spec = get_spec(skip_heads_of)
        loaded = loaded._replace(state={k: v for k, v in loaded.state.items() if not spec.is_head_key(k)})
    merged, report = merge_state(model.state_dict(), loaded.state, min_match=min_match)
    model.load_state_dict(merged)
    return report


def recorded_arch_kwargs(arch: str, model: nn.Module) -> dict[str, Any]:
    """The constructor arguments of ``model`` that its checkpoint must record to rebuild it."""
    return {name: getattr(model, name) for name in _RECORDED_KWARGS.get(arch, ())}


def head_parameter_names(arch: str, model: nn.Module) -> list[str]:
    """State keys of the head and auxiliary heads of ``model`` (parameters and buffers)."""
    spec = get_spec(arch)
    return [k for k in model.state_dict() if spec.is_head_key(k)]


def load_classifier(path: str | os.PathLike[str]) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the checkpoint's architecture, restore its weights strictly, set eval mode.

    Returns ``(model, meta)``. Raises CheckpointError (unreadable, partial) or
    IncompatibleCheckpointError (keys or shapes do not fit the architecture).
    """
    loaded = load_checkpoint(path)
    model = classifier_from_state(loaded.state, loaded.meta, where=str(path))
    return model, loaded.meta


def classifier_from_state(state: dict[str, torch.Tensor], meta: CheckpointMeta, *, where: str = "<state>") -> nn.Module:
    """Build ``meta.arch`` and load ``state`` into it strictly; returns the model in eval mode."""
    if meta.partial:
        raise CheckpointError(where, "partial checkpoint: merge it into a full one (`headswap merge`)")
    model = build_classifier(meta.arch, meta.num_classes, arch_kwargs=meta.arch_kwargs)
    _, report = merge_state(model.state_dict(), state)
    if misfits := report.misfits():
        raise IncompatibleCheckpointError(
            f"{where}: state does not fit {meta.arch} with {meta.num_classes} classes ({misfits})", report)
    # A file keeps tensors, not the module versions a state_dict() carries as metadata; modules that
    # read theirs (mnasnet's) get those of the modules as built here, the code that wrote the file.
    versioned = OrderedDict(state)
    versioned._metadata = getattr(model.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    model.load_state_dict(versioned, strict=True)
    return model.eval()


def skeleton(arch: str, num_classes: int, *, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The model's structure without initialising weights where torch allows it.

    Built on the ``meta`` device (no memory, no init cost); the few builders that compute
    with tensors while building (RegNet's width schedule) are built on the CPU instead.
    """
    try:
        with torch.device("meta"):
            return build_classifier(arch, num_classes, arch_kwargs=arch_kwargs)
    except NotImplementedError:
        with torch.no_grad():
            return build_classifier(arch, num_classes, arch_kwargs=arch_kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _torchvision_model(arch: str, weights: str | None, arch_kwargs: dict[str, Any]) -> nn.Module:
    kwargs = {**_FIXED_KWARGS.get(arch, {}), **arch_kwargs}
    if weights is None:
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    enum = torchvision.models.get_model_weights(arch)
    try:
        resolved = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        names = ", ".join(w.name for w in enum)
        raise WeightsUnavailableError(arch, str(weights), f"expected DEFAULT or one of {names}") from None
    kwargs.pop("init_weights", None)
    try:
        with warnings.catch_warnings():
            # Auxiliary heads are replaced below, so their "not pretrained" warning is moot.
            warnings.filterwarnings("ignore", message="auxiliary heads in the pretrained")
            return torchvision.models.get_model(arch, weights=resolved, **kwargs)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            arch, str(weights),
            f"could not download {resolved.url} ({exc}). Offline, pre-cache it: copy the file "
            f"{resolved.url.rsplit('/', 1)[-1]} into {cache} (or set TORCH_HOME)",
        ) from None


def _fresh_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):  # squeezenet: a 1x1 conv, initialised as torchvision does
        conv = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(conv.bias)
        return conv
    raise TypeError(f"head is a {type(old).__name__}, expected Linear or Conv2d")
