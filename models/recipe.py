"""The fine-tuning recipe's choices and defaults: plain data and rules, no torch.

``headswap finetune --help`` is built from these names (so it starts without torch), and
``FinetuneConfig`` resolves its ``"auto"`` values with these functions, so the help, the run's
first line and the checkpoint's training summary say the same thing.

Why these defaults (measured with resnet18 on the built-in tasks, 2 CPU cores; the quickstart's
own numbers are in docs/quickstart.md):

* **AdamW**, not the seed's SGD: from scratch on ``shapes`` (200 images a class, 64 px, 12
  epochs) AdamW at lr 1e-3 reached 0.99 validation accuracy, SGD at 0.05 0.22 (at 0.01, 100
  images a class: 0.32; chance is 0.17). The seed's recipe stays one flag away:
  ``--optimizer sgd --lr 0.001`` (momentum 0.9).
* **The learning rate follows what trains**: a head on a frozen backbone is a linear model
  and takes 1e-2 (one epoch on ``glyphs`` from a ``shapes`` backbone: 0.54-0.65 at 1e-2,
  0.21-0.55 at 1e-3; SGD 0.60 at 1e-2, 0.27 at 1e-3); a whole network from scratch 1e-3; a
  whole pretrained network (``--from``, ``--weights``) 1e-4, the usual AdamW rate for
  fine-tuning ImageNet weights without washing out their features. (From the small ``shapes``
  backbone, 1e-3 did as well: one epoch on ``glyphs`` 0.52 and 0.62 against 0.47 and 0.66,
  three epochs 0.78 against 0.69; pass ``--lr`` when the backbone knows little.)
* **The input size follows the images**: the architecture's 224 pixels cost about 12x the
  compute of 64-pixel images and add no information, so ``auto`` is the images' own size,
  within what the architecture accepts (``ArchSpec.min_input_size``, ``input_multiple``).
* **12 epochs**: 0.99 on ``shapes`` (seeds 0 and 1; 0.98 with torch held to AVX2), where 10
  gave 0.96; about 2 minutes of training on 2 cores at 64 px.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from models.archs import get_spec

OptimizerName = Literal["adamw", "sgd"]
DeviceName = Literal["auto", "cpu", "cuda"]
TrainPolicy = Literal["head", "all"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
DEVICES: tuple[str, ...] = get_args(DeviceName)
POLICIES: tuple[str, ...] = get_args(TrainPolicy)

DEFAULT_OPTIMIZER: OptimizerName = "adamw"
DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 32
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
SGD_MOMENTUM = 0.9  # the seed's
# (optimizer, what trains and from what) -> peak learning rate. See the module docstring.
AUTO_LR: dict[tuple[str, str], float] = {
    ("adamw", "head"): 1e-2,
    ("adamw", "all, from scratch"): 1e-3,
    ("adamw", "all, pretrained"): 1e-4,
    ("sgd", "head"): 1e-2,
    ("sgd", "all, from scratch"): 1e-2,
    ("sgd", "all, pretrained"): 1e-3,  # the seed's fine-tune of every parameter
}
AUTO = "auto"
IMAGE_SIZE_SAMPLE = 64  # training images whose size the "auto" input size is read from


def lr_key(*, pretrained: bool, train: str) -> str:
    """The ``AUTO_LR`` key of a run: ``"head"``, ``"all, from scratch"`` or ``"all, pretrained"``."""
    if train == "head":
        return "head"
    return "all, pretrained" if pretrained else "all, from scratch"


def auto_lr(optimizer: str, *, pretrained: bool, train: str) -> float:
    """The default peak learning rate of ``optimizer`` for a run that trains ``train`` from the start described."""
    return AUTO_LR[(optimizer, lr_key(pretrained=pretrained, train=train))]


def describe_auto_lr() -> str:
    """``AUTO_LR`` in words, for ``--help``."""
    return "; ".join(f"{optimizer} " + ", ".join(f"{lr:g} ({key})" for (o, key), lr in AUTO_LR.items()
                                                 if o == optimizer) for optimizer in OPTIMIZERS)


def auto_image_size(arch: str, image_side: int) -> int:
    """The input size for images whose shorter side is ``image_side`` pixels.

    The images' own size, but no more than the architecture's input size (larger images are
    resized down to it), no less than its ``min_input_size``, and a multiple of its patch size
    (ViTs; rounded to the nearest one). A fixed-size network (maxvit_t) gets its own size.
    """
    spec = get_spec(arch)
    if spec.fixed_size:
        return spec.input_size
    size = max(spec.min_input_size, min(spec.input_size, image_side))
    step = spec.input_multiple
    return max(step * math.ceil(spec.min_input_size / step), step * round(size / step))


def check_image_size(arch: str, size: int) -> None:
    """Raise ValueError unless ``arch`` can train on ``size``-pixel inputs."""
    spec = get_spec(arch)
    if spec.fixed_size and size != spec.input_size:
        raise ValueError(f"{arch} is built for {spec.input_size}-pixel inputs only, found image_size {size}")
    if size < spec.min_input_size:
        raise ValueError(f"image_size {size} is below the {spec.min_input_size} pixels that {arch} needs")
    if size % spec.input_multiple:
        raise ValueError(f"image_size of {arch} must be a multiple of its {spec.input_multiple}-pixel patches, "
                         f"found {size}")
