"""One backbone, many heads (models/shared.py): versions, the split of every architecture, the mixed batch."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from torch import nn

from models import ARCHS, CheckpointMeta, IncompatibleCheckpointError, build_classifier, get_spec, skeleton
from models.recipe import auto_image_size
from models.shared import (
    AFTER_HEAD_OPS,
    FOLD_TOLERANCE,
    Backbone,
    Head,
    backbone_state,
    backbone_version,
    fold_batch_norms,
    head_from_state,
    head_state,
    heads_forward,
    shared_forward,
    split_classifier,
    split_from_state,
    tensor_bytes,
)
from tests.test_archs import GIANTS

# Besides the giants, the architectures whose check takes 2 s or more of CPU (one thread, measured:
# efficientnet_v2_l 5 s, convnext_large 8 s to build alone); each family keeps its smallest members
# in the default run, which checks the other 55 in about a minute of CPU.
SLOW = GIANTS | {
    "convnext_base", "convnext_large", "convnext_small", "efficientnet_b7", "efficientnet_v2_l",
    "regnet_x_16gf", "regnet_x_32gf", "regnet_y_16gf", "regnet_y_32gf", "resnext101_32x8d", "resnext101_64x4d",
    "swin_b", "swin_v2_b", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "vit_l_32", "wide_resnet101_2",
}
KEYS = ["a", "b", "b", "a"]  # interleaved, and not sorted by model


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in state.values())


def classes(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def calibrated(model: nn.Module, size: int) -> nn.Module:
    """``model`` in eval mode with its BatchNorm statistics those of one random batch: with the
    initial ones (mean 0, variance 1) some networks (efficientnet) give every image the same logits."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.train()(torch.randn(4, 3, size, size))
    return model.eval()


def two_models(arch: str) -> tuple[nn.Module, nn.Module, int]:
    """Two ``arch`` classifiers in eval mode with one backbone's weights and heads of 3 and 5 classes,
    and their input size: the smallest, but 64 pixels where the head is followed by pooling (squeezenet's
    head then sees a 3x3 map, not a 1x1 one that pooling would leave as it is)."""
    size = auto_image_size(arch, 64 if get_spec(arch).after_head else 1)
    kwargs = {"image_size": size} if get_spec(arch).input_multiple > 1 else {}
    torch.manual_seed(0)
    a = calibrated(build_classifier(arch, 3, arch_kwargs=kwargs), size)
    b = skeleton(arch, 5, arch_kwargs=kwargs).to_empty(device="cpu")
    # b's own state_dict, updated: a plain dict lacks the version metadata that mnasnet's loader demands
    state = b.state_dict()
    state.update(backbone_state(arch, a.state_dict()))
    state.update({k: torch.randn(v.shape) * 0.1 for k, v in head_state(arch, state).items()})
    b.load_state_dict(state, strict=True)
    return a, b.eval(), size


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in sorted(ARCHS)])
def test_mixed_batch_gives_each_model_its_own_logits(arch: str) -> None:
    """A mixed batch through one backbone pass and each image's own head gives each model's own logits."""
    a, b, size = two_models(arch)
    state_a, state_b = dict(a.state_dict()), b.state_dict()
    assert backbone_version(arch, state_a) == backbone_version(arch, state_b)
    x = torch.randn(len(KEYS), 3, size, size)
    rows = {key: [i for i, k in enumerate(KEYS) if k == key] for key in "ab"}
    # Each model runs on the whole batch and its own rows are kept: a batch of the shared pass's size,
    # so that kernels chosen by batch size do not blur the comparison (efficientnet_b4 alone differs
    # by 1.3e-3 between its logits for 2 images and for the same 2 among 4).
    with torch.inference_mode():
        want = {"a": a(x)[rows["a"]], "b": b(x)[rows["b"]]}
    assert not torch.allclose(want["a"][0], want["a"][1]), "the models must tell the images apart"
    backbone, head_a = split_classifier(a, arch)
    head_b = head_from_state(backbone, state_b, CheckpointMeta.for_arch(arch, classes(5)))
    with torch.inference_mode():
        got = shared_forward(backbone, {"a": head_a, "b": head_b}, x, KEYS)
    assert [t.shape for t in got] == [(3,), (5,), (5,), (3,)]
    for key in "ab":
        torch.testing.assert_close(torch.stack([got[i] for i in rows[key]]), want[key], atol=1e-4, rtol=0)
    # One copy of the backbone: the Backbone holds the model's own tensors, each Head its head's only.
    spec = get_spec(arch)
    main_head = {k: v for k, v in state_a.items() if k.startswith(f"{spec.head}.")}
    dropped = tuple(aux.rpartition(".")[0] + "." for aux in spec.aux_heads)
    kept = {k: v for k, v in backbone_state(arch, state_a).items() if not k.startswith(dropped)}
    assert tensor_bytes(backbone) == nbytes(kept)
    assert {t.data_ptr() for t in backbone.state_dict().values()} == {t.data_ptr() for t in kept.values()}
    assert tensor_bytes(head_a) == nbytes(main_head)
    assert tensor_bytes(head_b) == nbytes({k: v for k, v in state_b.items() if k.startswith(f"{spec.head}.")})
    # Folded as the serving engine folds it (or left as it was, where folding would drift): the same
    # features, within 10x the tolerance its own probe was held to.
    with torch.inference_mode():
        features = backbone(x)
    fold_batch_norms(backbone, torch.randn(1, 3, size, size))
    with torch.inference_mode():
        drift = (backbone(x) - features).abs().max() / features.abs().max()
    assert drift <= 10 * FOLD_TOLERANCE


def _batch_norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def test_fold_batch_norms_folds_every_one_after_a_convolution_and_keeps_the_function() -> None:
    model, _, _ = two_models("resnet18")
    backbone, _ = split_classifier(model, "resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = backbone(x)
    assert _batch_norms(backbone) == 20
    assert fold_batch_norms(backbone, torch.randn(1, 3, 64, 64)) == 20 and _batch_norms(backbone) == 0
    assert all(m.bias is not None for m in backbone.modules() if isinstance(m, nn.Conv2d))
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), before, atol=1e-4 * before.abs().max().item(), rtol=0)
    assert fold_batch_norms(backbone, x) == 0  # nothing left to fold


def test_fold_batch_norms_puts_every_module_back_when_the_features_would_drift() -> None:
    """A BatchNorm whose mean dwarfs its output: the folded convolution's output and bias cancel."""
    model, _, _ = two_models("resnet18")
    backbone, _ = split_classifier(model, "resnet18")
    bn = backbone.model.bn1
    bn.running_mean += 1e4 * bn.running_var.sqrt()
    bn.bias.data += 1e4 * bn.weight.data  # the same function: (x - mean) / std * w + b
    before = dict(backbone.model.named_modules())
    assert fold_batch_norms(backbone, torch.randn(1, 3, 64, 64)) == 0
    after = dict(backbone.model.named_modules())
    assert after.keys() == before.keys() and all(after[name] is module for name, module in before.items())


class _ConvUsedTwice(nn.Module):
    """A convolution that runs twice, each time before the same BatchNorm: neither may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(self.conv(x))))


class _ConvOutputUsedTwice(nn.Module):
    """A convolution's output read by its BatchNorm and by a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(64, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64).eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batch_norms_skips_a_convolution_that_runs_twice() -> None:
    model, _, _ = two_models("resnet18")
    backbone, _ = split_classifier(model, "resnet18")
    backbone.model.maxpool = _ConvUsedTwice()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = backbone(x)
    assert fold_batch_norms(backbone, torch.randn(1, 3, 64, 64)) == 20
    assert isinstance(backbone.model.maxpool.bn, nn.BatchNorm2d) and backbone.model.maxpool.conv.bias is not None
    with torch.inference_mode():
        torch.testing.assert_close(backbone(x), before, atol=1e-4 * before.abs().max().item(), rtol=0)


def test_fold_batch_norms_leaves_everything_when_a_convolutions_output_has_another_user() -> None:
    """Hooks see that the BatchNorm's input is the convolution's output, not that a skip connection
    reads it too: the probe's features tell, and the backbone stays as it was."""
    model, _, _ = two_models("resnet18")
    backbone, _ = split_classifier(model, "resnet18")
    backbone.model.maxpool = _ConvOutputUsedTwice()
    assert fold_batch_norms(backbone, torch.randn(1, 3, 64, 64)) == 0
    assert _batch_norms(backbone) == 21


def test_fold_batch_norms_leaves_models_running_in_other_threads_alone() -> None:
    """The engine folds a new backbone in the worker's follower thread while its main thread serves:
    the fold touches nothing but the new backbone's own modules (torch.fx, patching
    nn.Module.__call__ for the whole process while it traces, failed requests this way)."""
    serving, _, _ = two_models("resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = serving(x)
    stop, problems = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    got = serving(x)
                if not torch.equal(got, want):
                    problems.append("different logits")
            except Exception as exc:  # noqa: BLE001 - any failure of the serving thread is the finding
                problems.append(repr(exc))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(5):
            backbone, _ = split_classifier(two_models("resnet18")[0], "resnet18")
            assert fold_batch_norms(backbone, torch.randn(1, 3, 64, 64)) == 20
    finally:
        stop.set()
        thread.join()
    assert problems == []


def test_after_head_is_squeezenets_alone_and_every_op_is_known() -> None:
    assert {arch for arch, spec in ARCHS.items() if spec.after_head} == {"squeezenet1_0", "squeezenet1_1"}
    assert {op for spec in ARCHS.values() for op in spec.after_head} <= set(AFTER_HEAD_OPS)
    _, head = split_classifier(build_classifier("squeezenet1_1", 4), "squeezenet1_1")
    assert [type(m) for m in head.layers] == [nn.Conv2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten]


@pytest.mark.parametrize("arch", sorted(a for a in ARCHS if a.startswith("vit_")))
def test_vit_heads_hold_the_head_alone(arch: str) -> None:
    """What follows ``heads.head`` in every ViT, the giants included (built on the meta device): nothing."""
    assert [name for name, _ in skeleton(arch, 3).heads.named_children()] == ["head"]


def test_backbone_version_ignores_every_head() -> None:
    torch.manual_seed(0)
    state = build_classifier("googlenet", 3).state_dict()
    other = build_classifier("googlenet", 3).state_dict()  # other heads (aux1.fc2, aux2.fc2, fc) and backbone
    assert sorted(head_state("googlenet", state)) == [
        "aux1.fc2.bias", "aux1.fc2.weight", "aux2.fc2.bias", "aux2.fc2.weight", "fc.bias", "fc.weight",
    ]
    swapped = {**state, **head_state("googlenet", other)}
    assert backbone_state("googlenet", swapped).keys() | head_state("googlenet", swapped).keys() == state.keys()
    version = backbone_version("googlenet", state)
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    assert backbone_version("googlenet", swapped) == version
    for key in ("conv1.conv.weight", "aux1.fc1.weight", "inception5b.branch1.bn.running_var"):
        changed = dict(swapped)
        changed[key] = swapped[key].clone()
        changed[key].view(-1)[0] += 1.0
        assert backbone_version("googlenet", changed) != version, key


def test_split_from_state_and_heads_of_other_class_counts() -> None:
    """Three models on one backbone built from their states; the images of one head in one group."""
    torch.manual_seed(0)
    models = {n: build_classifier("resnet18", n).eval() for n in (2, 3, 4)}
    backbone_weights = backbone_state("resnet18", models[2].state_dict())
    for model in models.values():
        model.load_state_dict({**model.state_dict(), **backbone_weights})
    metas = {n: CheckpointMeta.for_arch("resnet18", classes(n)) for n in models}
    backbone, head2 = split_from_state(models[2].state_dict(), metas[2])
    heads = {2: head2, **{n: head_from_state(backbone, models[n].state_dict(), metas[n]) for n in (3, 4)}}
    keys = [4, 2, 4, 3, 3]
    x = torch.randn(len(keys), 3, 32, 32)
    with torch.inference_mode():
        got = shared_forward(backbone, heads, x, keys)
        for i, n in enumerate(keys):
            torch.testing.assert_close(got[i], models[n](x[i:i + 1])[0], atol=1e-4, rtol=0)
        assert shared_forward(backbone, heads, x[:0], []) == []
        same = shared_forward(backbone, heads, x, [3] * len(keys))
    torch.testing.assert_close(torch.stack(same), models[3](x), atol=1e-4, rtol=0)


def test_shared_forward_refuses_what_it_cannot_run() -> None:
    backbone, head = split_classifier(build_classifier("resnet18", 3), "resnet18")
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"^1 head keys for a batch of 2 images$"):
        shared_forward(backbone, {"a": head}, x, ["a"])
    with pytest.raises(KeyError, match=r"no head for \['b'\] among \['a'\]"):
        shared_forward(backbone, {"a": head}, x, ["a", "b"])


def test_heads_forward_runs_one_image_through_several_heads_on_one_backbone_pass() -> None:
    """A canary shadowing the stable head: the same rows through two heads, the backbone once."""
    torch.manual_seed(0)
    stable = build_classifier("resnet18", 3).eval()
    canary = build_classifier("resnet18", 5).eval()
    canary.load_state_dict({**canary.state_dict(), **backbone_state("resnet18", stable.state_dict())})
    meta = CheckpointMeta.for_arch("resnet18", classes(5))
    backbone, head = split_classifier(stable, "resnet18")
    heads = {"stable": head, "canary": head_from_state(backbone, canary.state_dict(), meta)}
    passes = []
    backbone.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected_canary = canary(x[[1, 3]])
        got = heads_forward(backbone, heads, x, {"stable": [0, 1, 2, 3], "canary": [1, 3]})
        expected_stable = nn.Sequential(backbone, head)(x)
    assert passes == [4, 4]  # heads_forward's one pass, then the reference
    torch.testing.assert_close(got["stable"], expected_stable, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["canary"], expected_canary, atol=1e-4, rtol=0)
    assert heads_forward(backbone, heads, x, {"stable": [], "canary": []}) == {}
    with pytest.raises(IndexError, match=r"^rows \[4\] outside a batch of 4 images$"):
        heads_forward(backbone, heads, x, {"stable": [4]})


def test_head_from_state_refuses_a_head_that_does_not_fit() -> None:
    model = build_classifier("resnet18", 5)
    state = dict(model.state_dict())
    backbone, _ = split_classifier(model, "resnet18")
    with pytest.raises(IncompatibleCheckpointError, match=r"^m: head fc does not fit resnet18 with 4 classes and "
                       r"512 features \(0 missing, 0 unexpected, 2 shape mismatches\)$") as info:
        head_from_state(backbone, state, CheckpointMeta.for_arch("resnet18", classes(4)), where="m")
    assert [m.key for m in info.value.report.shape_mismatched] == ["fc.bias", "fc.weight"]
    with pytest.raises(IncompatibleCheckpointError, match=r"\(1 missing, 0 unexpected, 0 shape mismatches\)$"):
        head_from_state(backbone, {"fc.weight": state["fc.weight"]}, CheckpointMeta.for_arch("resnet18", classes(5)))
    with pytest.raises(ValueError, match=r"^<state>: a resnet34 head cannot run on a resnet18 backbone$"):
        head_from_state(backbone, state, CheckpointMeta.for_arch("resnet34", classes(5)))


def test_head_from_state_follows_the_backbone_dtype_and_needs_only_head_tensors() -> None:
    model = build_classifier("squeezenet1_0", 3)
    state = dict(model.state_dict())
    backbone, _ = split_classifier(model, "squeezenet1_0")
    backbone.to(torch.float64)
    meta = CheckpointMeta.for_arch("squeezenet1_0", classes(3))
    head = head_from_state(backbone, head_state("squeezenet1_0", state), meta)
    assert isinstance(head, Head) and head.num_classes == 3
    assert head.layers[0].weight.dtype == torch.float64
    torch.testing.assert_close(head.layers[0].weight, state["classifier.1.weight"].double())


def test_backbone_runs_in_eval_mode_only() -> None:
    backbone, _ = split_classifier(build_classifier("googlenet", 3), "googlenet")
    assert isinstance(backbone, Backbone) and not backbone.training
    assert backbone.model.aux1 is None and backbone.model.aux2 is None
    with pytest.raises(RuntimeError, match="eval mode only"):
        backbone.train()
    assert backbone.eval() is backbone
