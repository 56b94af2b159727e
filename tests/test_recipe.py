"""The fine-tuning defaults: which learning rate and input size "auto" resolves to, and where a size is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.finetune import FinetuneConfig
from models.recipe import AUTO_LR, OPTIMIZERS, auto_image_size, auto_lr, check_image_size, describe_auto_lr


@pytest.mark.parametrize(
    ("arch", "side", "size"),
    [
        ("resnet18", 64, 64),  # the images' own size: 12x less compute than 224 on the demo images
        ("resnet18", 48, 48),
        ("resnet18", 375, 224),  # photos: the architecture's size, as before
        ("resnet18", 20, 32),  # no smaller than the table's floor
        ("efficientnet_b3", 1000, 300),
        ("alexnet", 48, 63),  # its pooling needs 63
        ("inception_v3", 64, 299),  # its auxiliary head needs 299
        ("maxvit_t", 64, 224),  # built for 224 only
        ("vit_b_16", 64, 64),
        ("vit_b_32", 48, 64),  # a whole number of 32-pixel patches, the nearest one
        ("vit_h_14", 64, 70),
        ("vit_h_14", 20, 42),
    ],
)
def test_auto_image_size_follows_the_images_within_what_the_architecture_takes(arch: str, side: int, size: int) -> None:
    assert auto_image_size(arch, side) == size
    check_image_size(arch, size)


@pytest.mark.parametrize(
    ("arch", "size", "message"),
    [
        ("alexnet", 48, "image_size 48 is below the 63 pixels that alexnet needs"),
        ("vit_b_16", 50, "image_size of vit_b_16 must be a multiple of its 16-pixel patches, found 50"),
        ("maxvit_t", 256, "maxvit_t is built for 224-pixel inputs only, found image_size 256"),
    ],
)
def test_an_image_size_the_architecture_cannot_train_on_is_refused_up_front(arch: str, size: int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        FinetuneConfig(arch=arch, data=Path("data"), out=Path("out.safetensors"), image_size=size)
    assert str(info.value) == message


def test_auto_lr_by_what_trains_and_from_what() -> None:
    assert {(o, k) for o, k in AUTO_LR} == {(o, k) for o in OPTIMIZERS
                                            for k in ("head", "all, from scratch", "all, pretrained")}
    assert auto_lr("adamw", pretrained=False, train="all") == 1e-3
    assert auto_lr("adamw", pretrained=True, train="all") == 1e-4  # keeps what the backbone knows
    assert auto_lr("adamw", pretrained=True, train="head") == auto_lr("adamw", pretrained=False, train="head") == 1e-2
    assert auto_lr("sgd", pretrained=True, train="all") == 1e-3  # the seed's
    assert describe_auto_lr().startswith("adamw 0.01 (head), 0.001 (all, from scratch), 0.0001 (all, pretrained); "
                                         "sgd ")


@pytest.mark.parametrize(
    ("start", "train", "lr"),
    [({}, "all", 1e-3), ({"from_checkpoint": Path("a.safetensors")}, "all", 1e-4),
     ({"from_checkpoint": Path("a.safetensors")}, "head", 1e-2), ({"weights": "DEFAULT"}, "all", 1e-4)],
)
def test_a_config_resolves_auto_values_and_keeps_given_ones(start: dict[str, object], train: str, lr: float) -> None:
    config = FinetuneConfig(arch="resnet18", data=Path("d"), out=Path("o.safetensors"), train=train, **start)  # type: ignore[arg-type]
    assert (config.lr, config.image_size, config.optimizer) == (None, None, "adamw")
    assert (config.resolved(64).lr, config.resolved(64).image_size) == (lr, 64)
    given = FinetuneConfig(arch="resnet18", data=Path("d"), out=Path("o.safetensors"), lr=0.05, image_size=96)
    assert (given.resolved(64).lr, given.resolved(64).image_size) == (0.05, 96)
