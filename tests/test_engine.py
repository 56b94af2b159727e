"""The worker's engine on the CPU: one batch mixing the input forms, each image answered alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models import load_checkpoint
from models.transforms import normalize, resize_crop
from service.errors import RequestError
from service.inference.decode import DecodeLimits, decode_image
from service.inference.engine import Engine, Item
from tests.images import jpeg
from tests.test_serve_predict import offline_probs


def test_a_batch_of_uint8_images_pixels_and_a_misfit_answers_each_like_the_offline_model(resnet18_ckpt: Path) -> None:
    """uint8 images are normalised together once stacked; normalised PIXELS join them as they are;
    PIXELS of the wrong size fail alone. Every answer is the offline model's for its image."""
    ckpt = load_checkpoint(resnet18_ckpt)
    engine = Engine(torch.device("cpu"), "fp32")
    engine.install({("m", "stable"): engine.prepare(ckpt.state, ckpt.meta, ckpt.version, "ckpt")}, ["m"])
    images = [jpeg(seed) for seed in range(4)]
    crops = [resize_crop(ckpt.meta)(decode_image(d, DecodeLimits())) for d in images]
    pixels = normalize(ckpt.meta)(crops[1])
    items = [Item("stable", crops[0]), Item("stable", pixels, normalized=True), Item("stable", crops[2]),
             Item("stable", torch.zeros(3, 8, 8), normalized=True), Item("stable", crops[3])]
    uniform = engine.run([items[0], items[2], items[4]])  # uint8 alone: the one-pass normalisation
    answers = engine.run(items)
    assert isinstance(answers[3], RequestError) and "PIXELS must be [B,3,224,224]" in str(answers[3])
    for answer, data in zip([answers[0], answers[1], answers[2], answers[4]], images):
        assert not isinstance(answer, RequestError)
        np.testing.assert_allclose(answer.probabilities, offline_probs(resnet18_ckpt, data), atol=1e-4)
    for alone, mixed in zip(uniform, [answers[0], answers[2], answers[4]]):
        np.testing.assert_allclose(alone.probabilities, mixed.probabilities, atol=1e-5)


def test_workers_fold_batch_norms_and_the_load_check_does_not(resnet18_ckpt: Path) -> None:
    """A worker's engine serves resnet18 with its 20 BatchNorms folded; the controller's load check
    (check_servable's engine) builds it as stored, sparing every load the fold's probe passes."""
    ckpt = load_checkpoint(resnet18_ckpt)

    def batch_norms(engine: Engine) -> int:
        loaded = engine.prepare(ckpt.state, ckpt.meta, ckpt.version, "ckpt")
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.backbone.modules())

    assert batch_norms(Engine(torch.device("cpu"), "fp32")) == 0
    assert batch_norms(Engine(torch.device("cpu"), "fp32", fold=False)) == 20
