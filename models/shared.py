"""One backbone, many heads: serve head-only fine-tunes of one network with one backbone pass per batch.

Checkpoints that differ only in their heads share a *backbone version* (the content hash of
their non-head tensors). ``split_classifier`` cuts a built classifier into a ``Backbone`` (the
network up to its main head, whose output is the head's input: the features) and a ``Head``
(the head and whatever the architecture's forward does after it, ``ArchSpec.after_head``);
``head_from_state`` builds the head of a further checkpoint alone, without its backbone; and
``shared_forward`` runs a mixed batch through the backbone once, then each group of images
through its own head::

    backbone, head_a = split_from_state(state_a, meta_a)
    heads = {"a": head_a, "b": head_from_state(backbone, state_b, meta_b)}
    logits = shared_forward(backbone, heads, batch, ["a", "b", "a"])  # 3 vectors, 2 lengths
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from types import MappingProxyType
from typing import TypeVar

import torch
from torch import Tensor, nn

from models.archs import get_spec
from models.build import classifier_from_state
from models.checkpoint import State, state_version
from models.errors import IncompatibleCheckpointError
from models.merge import merge_state
from models.meta import CheckpointMeta

K = TypeVar("K", bound=Hashable)

# What ``ArchSpec.after_head`` names, as modules that repeat the forward's own operations.
AFTER_HEAD_OPS: Mapping[str, Callable[[], nn.Module]] = MappingProxyType({
    "relu": nn.ReLU,
    "global_avg_pool": lambda: nn.AdaptiveAvgPool2d((1, 1)),
    "flatten": lambda: nn.Flatten(1),
})


def head_state(arch: str, state: State) -> State:
    """The tensors of ``state`` that belong to a head of ``arch``, auxiliary heads included.

    Raises UnknownArchitectureError for an unknown ``arch``; so do ``backbone_state`` and ``backbone_version``.
    """
    spec = get_spec(arch)
    return {k: v for k, v in state.items() if spec.is_head_key(k)}


def backbone_state(arch: str, state: State) -> State:
    """The tensors of ``state`` that belong to no head of ``arch`` (the complement of ``head_state``)."""
    spec = get_spec(arch)
    return {k: v for k, v in state.items() if not spec.is_head_key(k)}


def backbone_version(arch: str, state: State) -> str:
    """The content hash of the backbone tensors of ``state`` (``state_version`` of ``backbone_state``).

    Returns 12 hex digits, equal for checkpoints that differ only in their heads (auxiliary
    heads included).
    """
    return state_version(backbone_state(arch, state))


def tensor_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module`` (a tensor shared twice counts once)."""
    return sum(t.nbytes for t in chain(module.parameters(), module.buffers()))


@dataclass(frozen=True)
class HeadShape:
    """What a head that fits a backbone looks like: a Linear, or squeezenet's 1x1 Conv2d."""

    conv: bool
    in_features: int
    bias: bool

    @classmethod
    def of(cls, head: nn.Module) -> HeadShape:
        """The shape of ``head``; raises TypeError unless it is a Linear or a Conv2d."""
        if isinstance(head, nn.Linear):
            return cls(False, head.in_features, head.bias is not None)
        if isinstance(head, nn.Conv2d):
            return cls(True, head.in_channels, head.bias is not None)
        raise TypeError(f"head is a {type(head).__name__}, expected Linear or Conv2d")

    def empty(self, num_classes: int) -> nn.Module:
        """A head of this shape with ``num_classes`` outputs on the meta device (no memory, no init)."""
        with torch.device("meta"):
            if self.conv:
                return nn.Conv2d(self.in_features, num_classes, kernel_size=1, bias=self.bias)
            return nn.Linear(self.in_features, num_classes, bias=self.bias)


class Head(nn.Module):
    """A classifier's main head and what its forward does after it: features in, logits out."""

    def __init__(self, arch: str, head: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes: int = head.weight.shape[0]
        self.layers = nn.Sequential(head, *(AFTER_HEAD_OPS[op]() for op in get_spec(arch).after_head))
        self.eval()

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class _HeadReached(Exception):
    """Not an error: how ``_StopAtHead`` hands the head's input to ``Backbone.forward``."""

    def __init__(self, features: Tensor) -> None:
        super().__init__("the forward reached the head")
        self.features = features


class _StopAtHead(nn.Module):
    """Stands in for the head: ends the forward there, handing over the head's input."""

    def forward(self, x: Tensor) -> Tensor:
        raise _HeadReached(x)


class Backbone(nn.Module):
    """A classifier without its heads; its forward returns the main head's input (the features).

    Inference only: every model whose head runs on it shares these weights and statistics.
    """

    def __init__(self, model: nn.Module, arch: str, head_shape: HeadShape) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.head_shape = head_shape
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        # Replacing modules alone cannot make every forward return the head's input (squeezenet
        # flattens after its classifier in code), so the forward stops where the head was.
        try:
            self.model(x)
        except _HeadReached as reached:
            return reached.features
        raise RuntimeError(f"the {self.arch} forward returned without reaching its head")

    def train(self, mode: bool = True) -> Backbone:
        """Eval mode only; raises RuntimeError for ``mode=True``."""
        if mode:
            raise RuntimeError("a Backbone runs in eval mode only: training it would change every model that shares it")
        return super().train(False)


FOLD_TOLERANCE = 1e-5  # the folded features' largest difference on the probe, against the largest feature


def fold_batch_norms(backbone: Backbone, probe: Tensor) -> int:
    """Fold every BatchNorm whose input is a convolution's output into that convolution's weights
    and bias: the same function in one pass over the activations instead of two (resnet18 on a
    2-core CPU: 10% less time per batch at batch 1 and 16, up to 25% at batch 16 in other runs).
    Inference only, which a Backbone is.

    The pairs come from one probe forward with hooks on the backbone's own convolutions and
    BatchNorms (each must run once, the BatchNorm on the very tensor the convolution returned);
    the modules are then replaced in their parents. Nothing is traced and nothing outside this
    backbone is touched, so another thread may run other models meanwhile. Folding rounds
    differently, and a convolution's output might have other users than its BatchNorm: the
    folded backbone is kept only if its features for ``probe`` (a batch on the backbone's
    device) stay within FOLD_TOLERANCE of the largest feature, else every module is put back.
    Returns how many BatchNorms were folded (0: none, the backbone as it was).
    """
    pairs, want = _conv_bn_pairs(backbone, probe)
    if not pairs:
        return 0
    undo: list[tuple[nn.Module, str, nn.Module]] = []
    for conv, bn in pairs:
        undo += _replace(backbone.model, conv, _folded(conv, bn))
        undo += _replace(backbone.model, bn, nn.Identity())
    with torch.inference_mode():
        got = backbone(probe)
    drift = (got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    if not drift <= FOLD_TOLERANCE:
        for parent, name, module in reversed(undo):
            setattr(parent, name, module)
        return 0
    return len(pairs)


def _conv_bn_pairs(backbone: Backbone, probe: Tensor) -> tuple[list[tuple[nn.Conv2d, nn.BatchNorm2d]], Tensor]:
    """(convolution, BatchNorm) of the backbone where, in one forward of ``probe``, each ran once and
    the BatchNorm's input was the tensor the convolution returned; and that forward's features."""
    calls: dict[nn.Module, int] = {}
    outputs: dict[int, tuple[nn.Conv2d, Tensor]] = {}  # the tensors held, so that no id is reused
    found: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def conv_hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, Tensor):
            outputs[id(output)] = (module, output)  # type: ignore[assignment]

    def bn_hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        calls[module] = calls.get(module, 0) + 1
        source = outputs.get(id(args[0])) if args else None
        if source is not None and source[1] is args[0]:
            found.append((source[0], module))  # type: ignore[arg-type]

    hooks = []
    for module in backbone.model.modules():
        if type(module) is nn.Conv2d:
            hooks.append(module.register_forward_hook(conv_hook))
        elif type(module) is nn.BatchNorm2d and module.track_running_stats and module.running_mean is not None:
            hooks.append(module.register_forward_hook(bn_hook))
    try:
        with torch.inference_mode():
            features = backbone(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, bn) for conv, bn in found if calls[conv] == 1 and calls[bn] == 1], features


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution computing ``bn(conv(x))`` (``bn`` in eval mode): the new weights in float64, then in the conv's dtype."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=conv.groups, bias=True, padding_mode=conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        folded.bias.copy_(bias)
    return folded.train(conv.training).requires_grad_(conv.weight.requires_grad)


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put ``new`` wherever ``root`` holds ``old`` (a module may be held under several names);
    returns what to set back to undo it."""
    undo = []
    for _, module in list(root.named_modules(remove_duplicate=False)):
        for child_name, child in list(module._modules.items()):
            if child is old:
                setattr(module, child_name, new)
                undo.append((module, child_name, old))
    return undo


def split_classifier(model: nn.Module, arch: str) -> tuple[Backbone, Head]:
    """Cut ``model`` (an ``arch`` classifier from ``models.build``) into its backbone and main head.

    The model is taken apart in place, its tensors not copied: the main head moves into the
    Head, and the auxiliary heads are dropped with the modules that hold them (googlenet's
    ``aux1``/``aux2``, inception_v3's ``AuxLogits``, which its eval forward skips). Returns
    ``(backbone, head)`` in eval mode. Raises UnknownArchitectureError, TypeError for a head
    that is not a Linear or Conv2d.
    """
    spec = get_spec(arch)
    head = model.get_submodule(spec.head)
    shape = HeadShape.of(head)
    model.set_submodule(spec.head, _StopAtHead())
    for aux in spec.aux_heads:
        holder = aux.rpartition(".")[0]  # googlenet's aux1 and aux2, inception_v3's AuxLogits
        parent, _, name = holder.rpartition(".")
        setattr(model.get_submodule(parent), name, None)
    return Backbone(model, arch, shape), Head(arch, head)


def split_from_state(state: State, meta: CheckpointMeta, *, where: str = "<state>") -> tuple[Backbone, Head]:
    """Build ``meta.arch`` from a whole checkpoint's state (strictly) and split it.

    Returns ``(backbone, head)`` on the CPU in eval mode. Raises CheckpointError (a partial
    checkpoint), IncompatibleCheckpointError (the state does not fit).
    """
    return split_classifier(classifier_from_state(state, meta, where=where), meta.arch)


def head_from_state(backbone: Backbone, state: State, meta: CheckpointMeta, *, where: str = "<state>") -> Head:
    """The main head of a checkpoint of ``backbone``'s architecture, built alone to run on its features.

    ``state`` is the checkpoint's state, whole or partial; only the main head's tensors are read
    (copied to the backbone's device and dtype). Whether the checkpoint's backbone is this one
    (``backbone_version``) is the caller's to check. Returns the Head in eval mode. Raises
    ValueError when ``meta.arch`` is not the backbone's, IncompatibleCheckpointError when the
    head's tensors do not fit ``meta.num_classes`` and the backbone's features.
    """
    if meta.arch != backbone.arch:
        raise ValueError(f"{where}: a {meta.arch} head cannot run on a {backbone.arch} backbone")
    prefix = f"{get_spec(meta.arch).head}."
    tensors = {k: v for k, v in state.items() if k.startswith(prefix)}
    module = backbone.head_shape.empty(meta.num_classes)
    _, report = merge_state({prefix + k: v for k, v in module.state_dict().items()}, tensors, prefixes=())
    if misfits := report.misfits():
        raise IncompatibleCheckpointError(
            f"{where}: head {prefix[:-1]} does not fit {meta.arch} with {meta.num_classes} classes and "
            f"{backbone.head_shape.in_features} features ({misfits})", report)
    reference = next(backbone.parameters())
    module = module.to_empty(device=reference.device).to(reference.dtype)
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True)
    return Head(meta.arch, module)


def shared_forward(backbone: Backbone, heads: Mapping[K, Head], x: Tensor, keys: Sequence[K]) -> list[Tensor]:
    """Logits of a mixed batch: the backbone runs once on ``x``, each head once on its own images.

    ``keys[i]`` names the head (a key of ``heads``) of image ``x[i]``. Returns one 1-D logits
    tensor per image, in batch order, each of its head's class count (views of one tensor per
    head, on the backbone's device). Raises ValueError when ``keys`` and ``x`` differ in
    length, KeyError for a key that ``heads`` lacks.
    """
    if len(keys) != x.shape[0]:
        raise ValueError(f"{len(keys)} head keys for a batch of {x.shape[0]} images")
    groups: dict[K, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    logits = heads_forward(backbone, heads, x, groups)
    out: dict[int, Tensor] = {}
    for key, rows in groups.items():
        out.update(zip(rows, logits[key].unbind(0), strict=True))
    return [out[row] for row in range(len(keys))]


def heads_forward(backbone: Backbone, heads: Mapping[K, Head], x: Tensor, rows: Mapping[K, Sequence[int]]) -> dict[K, Tensor]:
    """The backbone once on ``x``, then each head of ``rows`` on its rows of the features.

    ``rows[k]`` are the images (row numbers of ``x``) that head ``k`` answers; an image may be
    answered by several heads (a canary shadowing the stable head costs one more head, not one
    more backbone pass). Returns ``{k: logits (len(rows[k]), C_k)}`` for every key with rows.
    Raises KeyError for a key that ``heads`` lacks, IndexError for a row outside ``x``.
    """
    missing = [key for key in rows if key not in heads]
    if missing:
        raise KeyError(f"no head for {missing!r} among {list(heads)!r}")
    outside = [row for wanted in rows.values() for row in wanted if not 0 <= row < x.shape[0]]
    if outside:
        raise IndexError(f"rows {outside} outside a batch of {x.shape[0]} images")
    if not any(rows.values()):
        return {}
    features = backbone(x)
    everything = list(range(x.shape[0]))
    return {key: heads[key](features if list(wanted) == everything
                            else features.index_select(0, torch.tensor(list(wanted), device=features.device)))
            for key, wanted in rows.items() if wanted}
