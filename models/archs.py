"""The architecture table: every torchvision classifier, where its head is, what it eats.

Plain data in the manner of torchvision's ``Weights`` and timm's ``PretrainedCfg``: one
read-only mapping of frozen dataclasses, importable without torch (``headswap archs`` reads
it and nothing else). ``tests/test_archs.py`` checks that it covers
``torchvision.models.list_models`` exactly, that every head path exists, that the parameter
counts are torchvision's and that every architecture trains at its smallest input size.

Preprocessing (resize, crop, interpolation, mean, std) is that of the ``transforms()`` of
each architecture's default torchvision weights, which ``tests/test_archs.py`` compares entry
by entry; ``preprocessing_weights`` names other weights where an entry says why.
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
    ``resize_size`` the shorter side it is resized to first. ``num_parameters`` counts the
    parameters with a 1000-class head (auxiliary heads included). ``min_input_size`` is the
    smallest input size fine-tuning uses: 32 pixels, or what the architecture needs (alexnet's
    pooling 63, inception_v3's auxiliary head 299); ``input_multiple`` what every input size
    must be a multiple of (a ViT's patch size); ``fixed_size`` marks a network built for its
    ``input_size`` alone (maxvit_t's window partition). ``preprocessing_weights`` names the
    torchvision weights whose ``transforms()`` the preprocessing fields copy. ``after_head``
    names what the forward does to the main head's output before returning it, in order
    (squeezenet: ``relu``, ``global_avg_pool``, ``flatten``; the names are ``models/shared.py``'s);
    empty where the head's output is the logits.
    """

    head: str
    input_size: int
    resize_size: int
    num_parameters: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    aux_heads: tuple[str, ...] = ()
    min_input_size: int = 32
    input_multiple: int = 1
    fixed_size: bool = False
    preprocessing_weights: str = "DEFAULT"
    after_head: tuple[str, ...] = ()

    @property
    def head_modules(self) -> tuple[str, ...]:
        """The main head followed by the auxiliary heads."""
        return (self.head, *self.aux_heads)

    def is_head_key(self, key: str) -> bool:
        """Whether state key ``key`` belongs to a head (main or auxiliary)."""
        return key.startswith(tuple(f"{head}." for head in self.head_modules))


# squeezenet's classifier is Dropout, the 1x1 Conv2d head, ReLU, AdaptiveAvgPool2d; its forward then flattens.
_SQUEEZENET_TAIL = ("relu", "global_avg_pool", "flatten")

ARCHS: MappingProxyType[str, ArchSpec] = MappingProxyType({
    "alexnet": ArchSpec("classifier.6", 224, 256, 61_100_840, min_input_size=63),
    "convnext_base": ArchSpec("classifier.2", 224, 232, 88_591_464),
    "convnext_large": ArchSpec("classifier.2", 224, 232, 197_767_336),
    "convnext_small": ArchSpec("classifier.2", 224, 230, 50_223_688),
    "convnext_tiny": ArchSpec("classifier.2", 224, 236, 28_589_128),
    "densenet121": ArchSpec("classifier", 224, 256, 7_978_856),
    "densenet161": ArchSpec("classifier", 224, 256, 28_681_000),
    "densenet169": ArchSpec("classifier", 224, 256, 14_149_480),
    "densenet201": ArchSpec("classifier", 224, 256, 20_013_928),
    "efficientnet_b0": ArchSpec("classifier.1", 224, 256, 5_288_548, interpolation="bicubic"),
    "efficientnet_b1": ArchSpec("classifier.1", 240, 255, 7_794_184),
    "efficientnet_b2": ArchSpec("classifier.1", 288, 288, 9_109_994, interpolation="bicubic"),
    "efficientnet_b3": ArchSpec("classifier.1", 300, 320, 12_233_232, interpolation="bicubic"),
    "efficientnet_b4": ArchSpec("classifier.1", 380, 384, 19_341_616, interpolation="bicubic"),
    "efficientnet_b5": ArchSpec("classifier.1", 456, 456, 30_389_784, interpolation="bicubic"),
    "efficientnet_b6": ArchSpec("classifier.1", 528, 528, 43_040_704, interpolation="bicubic"),
    "efficientnet_b7": ArchSpec("classifier.1", 600, 600, 66_347_960, interpolation="bicubic"),
    "efficientnet_v2_l": ArchSpec("classifier.1", 480, 480, 118_515_272, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "efficientnet_v2_m": ArchSpec("classifier.1", 480, 480, 54_139_356),
    "efficientnet_v2_s": ArchSpec("classifier.1", 384, 384, 21_458_488),
    "googlenet": ArchSpec("fc", 224, 256, 13_004_888, aux_heads=("aux1.fc2", "aux2.fc2")),
    "inception_v3": ArchSpec("fc", 299, 342, 27_161_264, aux_heads=("AuxLogits.fc",), min_input_size=299),
    "maxvit_t": ArchSpec("classifier.5", 224, 224, 30_919_624, interpolation="bicubic", min_input_size=224, fixed_size=True),
    "mnasnet0_5": ArchSpec("classifier.1", 224, 256, 2_218_512),
    "mnasnet0_75": ArchSpec("classifier.1", 224, 232, 3_170_208),
    "mnasnet1_0": ArchSpec("classifier.1", 224, 256, 4_383_312),
    "mnasnet1_3": ArchSpec("classifier.1", 224, 232, 6_282_256),
    "mobilenet_v2": ArchSpec("classifier.1", 224, 232, 3_504_872),
    "mobilenet_v3_large": ArchSpec("classifier.3", 224, 232, 5_483_032),
    "mobilenet_v3_small": ArchSpec("classifier.3", 224, 256, 2_542_856),
    "regnet_x_16gf": ArchSpec("fc", 224, 232, 54_278_536),
    "regnet_x_1_6gf": ArchSpec("fc", 224, 232, 9_190_136),
    "regnet_x_32gf": ArchSpec("fc", 224, 232, 107_811_560),
    "regnet_x_3_2gf": ArchSpec("fc", 224, 232, 15_296_552),
    "regnet_x_400mf": ArchSpec("fc", 224, 232, 5_495_976),
    "regnet_x_800mf": ArchSpec("fc", 224, 232, 7_259_656),
    "regnet_x_8gf": ArchSpec("fc", 224, 232, 39_572_648),
    "regnet_y_128gf": ArchSpec("fc", 384, 384, 644_812_894, interpolation="bicubic"),
    "regnet_y_16gf": ArchSpec("fc", 224, 232, 83_590_140),
    "regnet_y_1_6gf": ArchSpec("fc", 224, 232, 11_202_430),
    "regnet_y_32gf": ArchSpec("fc", 224, 232, 145_046_770),
    "regnet_y_3_2gf": ArchSpec("fc", 224, 232, 19_436_338),
    "regnet_y_400mf": ArchSpec("fc", 224, 232, 4_344_144),
    "regnet_y_800mf": ArchSpec("fc", 224, 232, 6_432_512),
    "regnet_y_8gf": ArchSpec("fc", 224, 232, 39_381_472),
    "resnet101": ArchSpec("fc", 224, 232, 44_549_160),
    "resnet152": ArchSpec("fc", 224, 232, 60_192_808),
    "resnet18": ArchSpec("fc", 224, 256, 11_689_512),
    "resnet34": ArchSpec("fc", 224, 256, 21_797_672),
    "resnet50": ArchSpec("fc", 224, 232, 25_557_032),
    "resnext101_32x8d": ArchSpec("fc", 224, 232, 88_791_336),
    "resnext101_64x4d": ArchSpec("fc", 224, 232, 83_455_272),
    "resnext50_32x4d": ArchSpec("fc", 224, 232, 25_028_904),
    "shufflenet_v2_x0_5": ArchSpec("fc", 224, 256, 1_366_792),
    "shufflenet_v2_x1_0": ArchSpec("fc", 224, 256, 2_278_604),
    "shufflenet_v2_x1_5": ArchSpec("fc", 224, 232, 3_503_624),
    "shufflenet_v2_x2_0": ArchSpec("fc", 224, 232, 7_393_996),
    "squeezenet1_0": ArchSpec("classifier.1", 224, 256, 1_248_424, after_head=_SQUEEZENET_TAIL),
    "squeezenet1_1": ArchSpec("classifier.1", 224, 256, 1_235_496, after_head=_SQUEEZENET_TAIL),
    "swin_b": ArchSpec("head", 224, 238, 87_768_224, interpolation="bicubic"),
    "swin_s": ArchSpec("head", 224, 246, 49_606_258, interpolation="bicubic"),
    "swin_t": ArchSpec("head", 224, 232, 28_288_354, interpolation="bicubic"),
    "swin_v2_b": ArchSpec("head", 256, 272, 87_930_848, interpolation="bicubic"),
    "swin_v2_s": ArchSpec("head", 256, 260, 49_737_442, interpolation="bicubic"),
    "swin_v2_t": ArchSpec("head", 256, 260, 28_351_570, interpolation="bicubic"),
    "vgg11": ArchSpec("classifier.6", 224, 256, 132_863_336),
    "vgg11_bn": ArchSpec("classifier.6", 224, 256, 132_868_840),
    "vgg13": ArchSpec("classifier.6", 224, 256, 133_047_848),
    "vgg13_bn": ArchSpec("classifier.6", 224, 256, 133_053_736),
    "vgg16": ArchSpec("classifier.6", 224, 256, 138_357_544),
    "vgg16_bn": ArchSpec("classifier.6", 224, 256, 138_365_992),
    "vgg19": ArchSpec("classifier.6", 224, 256, 143_667_240),
    "vgg19_bn": ArchSpec("classifier.6", 224, 256, 143_678_248),
    "vit_b_16": ArchSpec("heads.head", 224, 256, 86_567_656, input_multiple=16),
    "vit_b_32": ArchSpec("heads.head", 224, 256, 88_224_232, input_multiple=32),
    # DEFAULT is the 518-pixel IMAGENET1K_SWAG_E2E_V1, but vit_h_14 built without weights (from
    # scratch, or to load a checkpoint) takes 224-pixel inputs: the 224-pixel weights' preprocessing.
    "vit_h_14": ArchSpec("heads.head", 224, 224, 632_045_800, interpolation="bicubic", input_multiple=14,
                         preprocessing_weights="IMAGENET1K_SWAG_LINEAR_V1"),
    "vit_l_16": ArchSpec("heads.head", 224, 242, 304_326_632, input_multiple=16),
    "vit_l_32": ArchSpec("heads.head", 224, 256, 306_535_400, input_multiple=32),
    "wide_resnet101_2": ArchSpec("fc", 224, 232, 126_886_696),
    "wide_resnet50_2": ArchSpec("fc", 224, 232, 68_883_240),
})


def get_spec(arch: str) -> ArchSpec:
    """Return the table entry for ``arch``; raises UnknownArchitectureError if absent."""
    try:
        return ARCHS[arch]
    except KeyError:
        raise UnknownArchitectureError(arch, sorted(ARCHS)) from None
