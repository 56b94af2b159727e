"""Convention tests over every entry of the architecture table (timm/torchvision style)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models import (
    ARCHS,
    UnknownArchitectureError,
    build_classifier,
    count_parameters,
    get_spec,
    head_parameter_names,
    skeleton,
)
from models.recipe import auto_image_size, check_image_size
from models.summary import is_parameter

# Minutes of CPU and gigabytes of RAM each: run with `make test-slow`.
GIANTS = {"regnet_y_128gf", "vit_h_14", "vit_l_16"}


def test_table_covers_torchvision_exactly() -> None:
    assert set(ARCHS) == set(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_preprocessing_is_torchvisions(arch: str) -> None:
    """Resize, crop, interpolation, mean and std are those of torchvision's ``transforms()`` for the
    weights the entry names (DEFAULT unless it says why not). Building the transforms downloads nothing."""
    spec = ARCHS[arch]
    weights = torchvision.models.get_model_weights(arch)[spec.preprocessing_weights]
    theirs = weights.transforms()
    assert (spec.resize_size, spec.input_size, spec.interpolation, spec.mean, spec.std) == (
        *theirs.resize_size, *theirs.crop_size, theirs.interpolation.value, tuple(theirs.mean), tuple(theirs.std)
    )
    if spec.preprocessing_weights != "DEFAULT":  # a real exception (vit_h_14's; the table says why)
        assert weights.transforms().crop_size != torchvision.models.get_model_weights(arch).DEFAULT.transforms().crop_size


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_table_entry_matches_the_architecture(arch: str) -> None:
    """Head paths, the parameter count `headswap archs` lists, which state keys are parameters
    (what `headswap inspect` counts without building the model), and the smallest input size."""
    spec = ARCHS[arch]
    model = skeleton(arch, 1000)
    state = model.state_dict()
    for head in spec.head_modules:
        module = model.get_submodule(head)
        assert isinstance(module, (nn.Linear, nn.Conv2d)), f"{arch}.{head} is {type(module).__name__}"
        assert f"{head}.weight" in state
        assert state[f"{head}.weight"].shape[0] == 1000
    assert count_parameters(model) == spec.num_parameters
    assert {k for k in state if is_parameter(k)} == set(dict(model.named_parameters()))
    # Training mode at the smallest size fine-tuning picks (auxiliary heads included): shapes only,
    # on the meta device where the skeleton is there (RegNet's is on the CPU: a small real batch).
    size = auto_image_size(arch, 1)
    check_image_size(arch, size)
    if spec.input_multiple > 1:  # a ViT (patches) is built for its input size
        model = skeleton(arch, 1000, arch_kwargs={"image_size": size})
    device = next(model.parameters()).device
    model.train()(torch.zeros(2, 3, size, size, device=device))


@pytest.mark.parametrize(("arch", "size"), [("alexnet", 62), ("inception_v3", 298)])
def test_min_input_size_is_the_smallest_that_trains(arch: str, size: int) -> None:
    assert ARCHS[arch].min_input_size == size + 1
    with torch.device("meta"), pytest.raises(RuntimeError):
        skeleton(arch, 3).train()(torch.zeros(2, 3, size, size))


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a in GIANTS else a for a in sorted(ARCHS)]
)
def test_every_architecture_builds_with_new_head_and_runs(arch: str) -> None:
    torch.manual_seed(0)
    spec = get_spec(arch)
    model = build_classifier(arch, 7).eval()
    for head in spec.head_modules:
        assert model.get_submodule(head).weight.shape[0] == 7
    with torch.inference_mode():
        out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_head_parameter_names_of_aux_architectures() -> None:
    assert head_parameter_names("googlenet", skeleton("googlenet", 3)) == [
        "aux1.fc2.weight", "aux1.fc2.bias", "aux2.fc2.weight", "aux2.fc2.bias", "fc.weight", "fc.bias",
    ]
    assert head_parameter_names("squeezenet1_1", skeleton("squeezenet1_1", 3)) == [
        "classifier.1.weight", "classifier.1.bias",
    ]


def test_squeezenet_head_is_a_fresh_1x1_conv() -> None:
    head = build_classifier("squeezenet1_0", 12).get_submodule("classifier.1")
    assert isinstance(head, nn.Conv2d)
    assert (head.out_channels, head.kernel_size) == (12, (1, 1))


def test_unknown_architecture_says_what_was_expected() -> None:
    with pytest.raises(UnknownArchitectureError, match=r"unknown architecture 'resnet19'.*resnet18") as info:
        build_classifier("resnet19", 3)
    assert info.value.arch == "resnet19"
    assert isinstance(info.value, ValueError)


def test_bad_num_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="num_classes must be at least 1, found 0"):
        build_classifier("resnet18", 0)
