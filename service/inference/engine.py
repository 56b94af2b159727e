"""Where a batch of image tensors becomes class probabilities, inside one inference worker.

An ``Engine`` holds the worker's model slots (``stable``, and ``canary`` once rollouts use
it), each a model already on the device, cast and in channels_last. ``run`` takes a batch
whose items may name different slots: each slot's items go through its own weights, and an
item that cannot run (say, pixels of the wrong size) fails alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from models import CheckpointMeta, classifier_from_state
from models.transforms import normalize, resize_crop
from service.errors import RequestError
from service.inference.decode import decode_jpegs

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Item:
    """One image for one slot: uint8 (3, H, W) from a decoded image, normalised float pixels, or
    (``image`` None) the bytes of a JPEG to decode on the worker's device."""

    slot: str
    image: torch.Tensor | None
    normalized: bool = False
    top_k: int = 5
    jpeg: bytes = b""


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # float32 (num_classes,)
    top: list[tuple[str, int, float]]
    version: str
    slot: str


@dataclass
class Loaded:
    """A slot's content: the model as it runs, and what it is."""

    model: nn.Module
    meta: CheckpointMeta
    version: str
    checkpoint: str


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


class Engine:
    """The models of one worker and the forward pass over mixed-slot batches."""

    def __init__(self, device: torch.device, precision: str) -> None:
        self.device = device
        self.precision = precision
        self.slots: dict[str, Loaded] = {}
        self.timings: dict[str, float] = {}  # forward seconds per slot of the last run()
        self.decoded = 0  # JPEGs the last run() decoded on the device

    def prepare(self, state: dict[str, torch.Tensor], meta: CheckpointMeta, version: str, checkpoint: str) -> Loaded:
        """Build a servable model from a state (not yet serving): device, layout, warm-up.

        Raises IncompatibleCheckpointError if the state does not fit, ValueError if the
        warm-up gives non-finite outputs or the wrong shape.
        """
        model = classifier_from_state(state, meta, where=checkpoint)
        model = model.to(self.device, memory_format=torch.channels_last)
        loaded = Loaded(model, meta, version, checkpoint)
        self._warm_up(loaded)
        return loaded

    def install(self, slot: str, loaded: Loaded | None) -> None:
        """Put ``loaded`` into ``slot`` (None empties it). Called between batches only."""
        if loaded is None:
            self.slots.pop(slot, None)
        else:
            self.slots[slot] = loaded

    def run(self, items: list[Item]) -> list[Answer | RequestError]:
        """Answer every item; an item that cannot run gets its own RequestError."""
        answers: list[Answer | RequestError] = [RequestError("not run")] * len(items)
        self.timings = {}
        self.decoded = 0
        for slot in sorted({item.slot for item in items}):
            index = [i for i, item in enumerate(items) if item.slot == slot]
            loaded = self.slots.get(slot) or self.slots.get("stable")
            if loaded is None:
                raise RuntimeError("no model loaded")
            batch, ok = self._stack(loaded.meta, [items[i] for i in index])
            for i, err in zip(index, ok):
                if err is not None:
                    answers[i] = err
            good = [i for i, err in zip(index, ok) if err is None]
            if good:
                served = slot if slot in self.slots else "stable"
                started = time.perf_counter()
                probs = self.forward(loaded, batch)
                self.timings[served] = self.timings.get(served, 0.0) + time.perf_counter() - started
                for row, i in enumerate(good):
                    answers[i] = _answer(probs[row], loaded, items[i].top_k, served)
        return answers

    def forward(self, loaded: Loaded, batch: torch.Tensor) -> np.ndarray:
        """Normalised float batch (B, 3, S, S), on any device -> softmax probabilities, float32 numpy (B, C)."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=_DTYPES[self.precision])
            if self.precision != "fp32" else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = loaded.model(batch)
        return logits.float().softmax(dim=-1).cpu().numpy()

    def _stack(self, meta: CheckpointMeta, items: list[Item]) -> tuple[torch.Tensor, list[RequestError | None]]:
        """The items as one normalised batch on the device (uint8 images go there before they are
        resized and normalised); an item that cannot join it gets its RequestError."""
        size = meta.input_size
        tensors: list[torch.Tensor] = []
        errors: list[RequestError | None] = []
        norm = normalize(meta)
        jpegs = [item.jpeg for item in items if item.image is None]
        results = decode_jpegs(jpegs, self.device) if jpegs else []
        self.decoded += sum(isinstance(r, torch.Tensor) for r in results)
        decoded = iter(results)
        for item in items:
            image = next(decoded) if item.image is None else item.image.to(self.device, non_blocking=True)
            if isinstance(image, RequestError):
                errors.append(image)
                continue
            if not item.normalized:
                if item.image is None or image.shape[-2:] != (size, size):  # decoded here, or cropped for another model
                    image = resize_crop(meta)(image)
                image = norm(image)
            elif tuple(image.shape) != (3, size, size):
                errors.append(RequestError(
                    f"PIXELS must be [B,3,{size},{size}] for this model, found {list(image.shape)}", reason="shape"))
                continue
            tensors.append(image)
            errors.append(None)
        return (torch.stack(tensors) if tensors else torch.empty(0)), errors

    def warm_up_decoder(self) -> None:
        """Start the device's JPEG decoder (nvJPEG on CUDA) before the first request needs it."""
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="JPEG")
        result = decode_jpegs([buf.getvalue()], self.device)[0]
        if isinstance(result, RequestError):
            raise RuntimeError(f"{self.device} cannot decode JPEGs: {result}")  # noqa: TRY004 - the device failed, not an argument

    def _warm_up(self, loaded: Loaded) -> None:
        size = loaded.meta.input_size
        started = time.perf_counter()
        probs = self.forward(loaded, torch.zeros(2, 3, size, size))
        if probs.shape != (2, loaded.meta.num_classes) or not np.isfinite(probs).all():
            raise ValueError(
                f"warm-up gave {'non-finite outputs' if probs.shape[-1:] == (loaded.meta.num_classes,) else 'shape ' + str(probs.shape)}"
                f" (expected finite (2, {loaded.meta.num_classes}))"
            )
        log.debug("warm-up of %s took %.0f ms", loaded.version, (time.perf_counter() - started) * 1000)


def check_servable(state: dict[str, torch.Tensor], meta: CheckpointMeta, version: str) -> None:
    """Build ``state`` as a worker would, on the CPU, and warm it up. Raises IncompatibleCheckpointError
    if it does not fit its architecture, ValueError if the warm-up gives non-finite or misshapen outputs."""
    Engine(torch.device("cpu"), "fp32").prepare(state, meta, version, "candidate")


def _answer(probs: np.ndarray, loaded: Loaded, top_k: int, slot: str) -> Answer:
    k = max(1, min(top_k, probs.shape[0]))
    order = np.argsort(-probs, kind="stable")[:k]
    top = [(loaded.meta.class_names[i], int(i), float(probs[i])) for i in order]
    return Answer(probs.astype(np.float32), top, loaded.version, slot)
