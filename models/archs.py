"""The architecture table: every torchvision classifier, where its head is, what it eats.

Plain data in the manner of torchvision's ``Weights`` and timm's ``PretrainedCfg``: one
read-only mapping of frozen dataclasses. ``tests/test_archs.py`` checks that it covers
``torchvision.models.list_models`` exactly and that every head path exists.

Input sizes and normalisation are those of each architecture's default torchvision
weights (vit_h_14: its 224-pixel weights, since a ViT built without weights is 224).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from models.errors import UnknownArchitectureError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's classification head is and how its inputs are prepared.

    ``head`` is the dotted path of the module that maps features to class logits (a
    Linear, or squeezenet's 1x1 Conv2d); ``aux_heads`` are the auxiliary classifiers of
    googlenet and inception_v3. ``input_size`` is the square crop fed to the network,
    ``resize_size`` the shorter side it is resized to first.
    """

    head: str
    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aux_heads: tuple[str, ...] = ()

    @property
    def head_modules(self) -> tuple[str, ...]:
        """The main head followed by the auxiliary heads."""
        return (self.head, *self.aux_heads)


ARCHS: MappingProxyType[str, ArchSpec] = MappingProxyType({
    "alexnet": ArchSpec("classifier.6", 224, 256),
    "convnext_base": ArchSpec("classifier.2", 224, 232),
    "convnext_large": ArchSpec("classifier.2", 224, 232),
    "convnext_small": ArchSpec("classifier.2", 224, 230),
    "convnext_tiny": ArchSpec("classifier.2", 224, 236),
    "densenet121": ArchSpec("classifier", 224, 256),
    "densenet161": ArchSpec("classifier", 224, 256),
    "densenet169": ArchSpec("classifier", 224, 256),
    "densenet201": ArchSpec("classifier", 224, 256),
    "efficientnet_b0": ArchSpec("classifier.1", 224, 256, interpolation="bicubic"),
    "efficientnet_b1": ArchSpec("classifier.1", 240, 255),
    "efficientnet_b2": ArchSpec("classifier.1", 288, 288, interpolation="bicubic"),
    "efficientnet_b3": ArchSpec("classifier.1", 300, 320, interpolation="bicubic"),
    "efficientnet_b4": ArchSpec("classifier.1", 380, 384, interpolation="bicubic"),
    "efficientnet_b5": ArchSpec("classifier.1", 456, 456, interpolation="bicubic"),
    "efficientnet_b6": ArchSpec("classifier.1", 528, 528, interpolation="bicubic"),
    "efficientnet_b7": ArchSpec("classifier.1", 600, 600, interpolation="bicubic"),
    "efficientnet_v2_l": ArchSpec("classifier.1", 480, 480, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "efficientnet_v2_m": ArchSpec("classifier.1", 480, 480),
    "efficientnet_v2_s": ArchSpec("classifier.1", 384, 384),
    "googlenet": ArchSpec("fc", 224, 256, aux_heads=("aux1.fc2", "aux2.fc2")),
    "inception_v3": ArchSpec("fc", 299, 342, aux_heads=("AuxLogits.fc",)),
    "maxvit_t": ArchSpec("classifier.5", 224, 224, interpolation="bicubic"),
    "mnasnet0_5": ArchSpec("classifier.1", 224, 256),
    "mnasnet0_75": ArchSpec("classifier.1", 224, 232),
    "mnasnet1_0": ArchSpec("classifier.1", 224, 256),
    "mnasnet1_3": ArchSpec("classifier.1", 224, 232),
    "mobilenet_v2": ArchSpec("classifier.1", 224, 232),
    "mobilenet_v3_large": ArchSpec("classifier.3", 224, 232),
    "mobilenet_v3_small": ArchSpec("classifier.3", 224, 256),
    "regnet_x_16gf": ArchSpec("fc", 224, 232),
    "regnet_x_1_6gf": ArchSpec("fc", 224, 232),
    "regnet_x_32gf": ArchSpec("fc", 224, 232),
    "regnet_x_3_2gf": ArchSpec("fc", 224, 232),
    "regnet_x_400mf": ArchSpec("fc", 224, 232),
    "regnet_x_800mf": ArchSpec("fc", 224, 232),
    "regnet_x_8gf": ArchSpec("fc", 224, 232),
    "regnet_y_128gf": ArchSpec("fc", 384, 384, interpolation="bicubic"),
    "regnet_y_16gf": ArchSpec("fc", 224, 232),
    "regnet_y_1_6gf": ArchSpec("fc", 224, 232),
    "regnet_y_32gf": ArchSpec("fc", 224, 232),
    "regnet_y_3_2gf": ArchSpec("fc", 224, 232),
    "regnet_y_400mf": ArchSpec("fc", 224, 232),
    "regnet_y_800mf": ArchSpec("fc", 224, 232),
    "regnet_y_8gf": ArchSpec("fc", 224, 232),
    "resnet101": ArchSpec("fc", 224, 232),
    "resnet152": ArchSpec("fc", 224, 232),
    "resnet18": ArchSpec("fc", 224, 256),
    "resnet34": ArchSpec("fc", 224, 256),
    "resnet50": ArchSpec("fc", 224, 232),
    "resnext101_32x8d": ArchSpec("fc", 224, 232),
    "resnext101_64x4d": ArchSpec("fc", 224, 232),
    "resnext50_32x4d": ArchSpec("fc", 224, 232),
    "shufflenet_v2_x0_5": ArchSpec("fc", 224, 256),
    "shufflenet_v2_x1_0": ArchSpec("fc", 224, 256),
    "shufflenet_v2_x1_5": ArchSpec("fc", 224, 232),
    "shufflenet_v2_x2_0": ArchSpec("fc", 224, 232),
    "squeezenet1_0": ArchSpec("classifier.1", 224, 256),
    "squeezenet1_1": ArchSpec("classifier.1", 224, 256),
    "swin_b": ArchSpec("head", 224, 238, interpolation="bicubic"),
    "swin_s": ArchSpec("head", 224, 246, interpolation="bicubic"),
    "swin_t": ArchSpec("head", 224, 232, interpolation="bicubic"),
    "swin_v2_b": ArchSpec("head", 256, 272, interpolation="bicubic"),
    "swin_v2_s": ArchSpec("head", 256, 260, interpolation="bicubic"),
    "swin_v2_t": ArchSpec("head", 256, 260, interpolation="bicubic"),
    "vgg11": ArchSpec("classifier.6", 224, 256),
    "vgg11_bn": ArchSpec("classifier.6", 224, 256),
    "vgg13": ArchSpec("classifier.6", 224, 256),
    "vgg13_bn": ArchSpec("classifier.6", 224, 256),
    "vgg16": ArchSpec("classifier.6", 224, 256),
    "vgg16_bn": ArchSpec("classifier.6", 224, 256),
    "vgg19": ArchSpec("classifier.6", 224, 256),
    "vgg19_bn": ArchSpec("classifier.6", 224, 256),
    "vit_b_16": ArchSpec("heads.head", 224, 256),
    "vit_b_32": ArchSpec("heads.head", 224, 256),
    "vit_h_14": ArchSpec("heads.head", 224, 224, interpolation="bicubic"),
    "vit_l_16": ArchSpec("heads.head", 224, 242),
    "vit_l_32": ArchSpec("heads.head", 224, 256),
    "wide_resnet101_2": ArchSpec("fc", 224, 232),
    "wide_resnet50_2": ArchSpec("fc", 224, 232),
})


def get_spec(arch: str) -> ArchSpec:
    """Return the table entry for ``arch``; raises UnknownArchitectureError if absent."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise UnknownArchitectureError(arch, sorted(ARCHS)) from None
