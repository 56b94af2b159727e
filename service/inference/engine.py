"""Where a batch of image tensors becomes class probabilities, inside one inference worker.

An ``Engine`` holds the worker's served versions by (model, slot): each a ``Head`` on the device
and a ``Backbone`` shared by every version whose non-head tensors are the same (its backbone
version, ``models.shared``), in channels_last, with its BatchNorms folded into the convolutions
before them where that keeps its features (``models.shared.fold_batch_norms``). ``run`` takes a
batch whose items may name different models and slots: the images of every version that shares a
backbone and its preprocessing go through one backbone pass, then each through its own version's
head; an item that cannot run (say, pixels of the wrong size) fails alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from models import CheckpointMeta
from models.shared import (
    Backbone,
    Head,
    backbone_version,
    fold_batch_norms,
    head_from_state,
    heads_forward,
    split_from_state,
    tensor_bytes,
)
from models.transforms import normalize, resize_crop
from service.errors import NotFound, RequestError
from service.inference.decode import decode_jpegs

log = logging.getLogger(__name__)

K = TypeVar("K")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Item:
    """One image for one model's slot: uint8 (3, H, W) from a decoded image, normalised float pixels,
    or (``image`` None) the bytes of a JPEG to decode on the worker's device. ``model`` "": the default."""

    slot: str
    image: torch.Tensor | None
    normalized: bool = False
    top_k: int = 5
    jpeg: bytes = b""
    model: str = ""
    shadow: bool = False  # also run the model's canary, for comparison


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # float32 (num_classes,)
    top: list[tuple[str, int, float]]
    version: str
    slot: str
    shadow: tuple[str, int] | None = None  # the canary's version and top class, when it shadowed this item


@dataclass
class Loaded:
    """A served version as it runs: its head, the backbone it shares, and what it is. Evicted (over
    --memory-budget-mb), ``backbone`` and ``head`` are None until it is loaded again."""

    backbone: Backbone | None
    head: Head | None
    meta: CheckpointMeta
    version: str
    checkpoint: str
    backbone_version: str
    backbone_bytes: int = 0  # bytes of its backbone's and its head's tensors, resident or not
    head_bytes: int = 0

    @property
    def resident(self) -> bool:
        return self.head is not None

    @property
    def pass_key(self) -> tuple[object, ...]:
        """Versions with equal keys share one backbone pass: one backbone, one preprocessing."""
        m = self.meta
        return (id(self.backbone), m.input_size, m.resize_size, m.interpolation, tuple(m.mean), tuple(m.std))


@dataclass(frozen=True)
class Entry:
    """An item of a batch for one version: its answer, or (``shadow``) the canary's comparison."""

    item: int
    model: str
    slot: str
    loaded: Loaded
    shadow: bool = False


@dataclass(frozen=True)
class BackbonePass:
    """One backbone forward pass of the last ``run``: the backbone version and its images."""

    backbone_version: str
    images: int


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


class Engine:
    """The served versions of one worker and the forward pass over mixed batches."""

    def __init__(self, device: torch.device, precision: str, *, budget_bytes: int = 0,
                 reload: Callable[[str], tuple[dict[str, torch.Tensor], CheckpointMeta]] | None = None,
                 fold: bool = True) -> None:
        self.device = device
        self.precision = precision
        self.fold = fold  # fold each new backbone's BatchNorms into its convolutions
        self.budget_bytes = budget_bytes  # resident backbones and heads at most (0: no bound)
        self.reload = reload  # a served version's state and meta, to load it again once evicted
        self.last_used: dict[str, float] = {}  # version -> when a batch last needed it
        # ("load", version, reason) / ("evict", version, ""), not yet counted; appended by the follower's
        # prepare thread too, so the worker drains it with popleft (a deque's appends and pops are thread-safe)
        self.events: deque[tuple[str, str, str]] = deque()
        self.slots: dict[tuple[str, str], Loaded] = {}  # (model, slot) -> what it serves
        self.names: list[str] = []  # the served models, the default first
        self._backbones: weakref.WeakValueDictionary[tuple[str, str, str], Backbone] = weakref.WeakValueDictionary()
        self.timings: dict[tuple[str, str], float] = {}  # forward seconds per (model, slot) of the last run()
        self.passes: list[BackbonePass] = []  # backbone passes of the last run()
        self.decoded = 0  # JPEGs the last run() decoded on the device

    def prepare(self, state: dict[str, torch.Tensor], meta: CheckpointMeta, version: str, checkpoint: str,
                backbone: str | None = None) -> Loaded:
        """Build a servable version from a state (not yet serving): its head, on the backbone already
        resident when its backbone version is, else a new backbone (device, layout); then a warm-up.
        ``backbone`` is its backbone version when known (the controller's, in the shared state), else
        it is hashed here.

        Raises IncompatibleCheckpointError if the state does not fit, ValueError if the
        warm-up gives non-finite outputs or the wrong shape.
        """
        backbone_ver = backbone or backbone_version(meta.arch, state)
        built, head = self._build(state, meta, checkpoint, backbone_ver)
        loaded = Loaded(built, head, meta, version, checkpoint, backbone_ver, tensor_bytes(built), tensor_bytes(head))
        self._warm_up(loaded)
        return loaded

    def _build(self, state: dict[str, torch.Tensor], meta: CheckpointMeta, checkpoint: str,
               backbone_ver: str) -> tuple[Backbone, Head]:
        """The head of ``state`` on the resident backbone of its backbone version, else on a new one."""
        key = (meta.arch, backbone_ver, json.dumps(meta.arch_kwargs, sort_keys=True))
        backbone = self._backbones.get(key)
        if backbone is None:
            backbone, head = split_from_state(state, meta, where=checkpoint)
            backbone = backbone.to(self.device)
            if self.fold:
                probe = torch.randn(1, 3, meta.input_size, meta.input_size, generator=torch.Generator().manual_seed(0))
                folded = fold_batch_norms(backbone, probe.to(self.device))
                log.debug("%s: %d BatchNorms folded into their convolutions", checkpoint, folded)
            backbone = backbone.to(memory_format=torch.channels_last)  # the folded convolutions' new weights too
            head = head.to(self.device)
            self._backbones[key] = backbone
        else:
            head = head_from_state(backbone, state, meta, where=checkpoint)
        return backbone, head

    def install(self, served: dict[tuple[str, str], Loaded], names: list[str]) -> None:
        """Serve exactly ``served`` ((model, slot) -> version) of the models ``names``, the first of them (the
        default) answering for "". Between batches only."""
        self.slots = dict(served)
        self.names = list(names)
        self._fit(set())

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of the tensors of the served backbones and heads that are resident, each counted once."""
        resident = [x for x in self.slots.values() if x.resident]
        backbones = {id(x.backbone): x.backbone_bytes for x in resident}
        heads = {id(x.head): x.head_bytes for x in resident}
        return {"backbone": sum(backbones.values()), "head": sum(heads.values())}

    def resident_models(self) -> list[str]:
        """The served models every slot of which is resident."""
        return [name for name in self.names
                if all(x.resident for (model, _), x in self.slots.items() if model == name)]

    def _ensure(self, needed: list[Loaded]) -> None:
        """Load again every evicted version of ``needed`` (from the worker's copy of the served weights: no
        re-validation), then evict the least recently used others until the budget holds."""
        now = time.monotonic()
        for loaded in needed:
            self.last_used[loaded.version] = now
            if not loaded.resident:
                if self.reload is None:
                    raise RuntimeError(f"version {loaded.version} was evicted and cannot be loaded again")
                state, meta = self.reload(loaded.version)
                loaded.backbone, loaded.head = self._build(state, meta, loaded.checkpoint, loaded.backbone_version)
                self.events.append(("load", loaded.version, "cold"))
        self._fit({loaded.version for loaded in needed})

    def _fit(self, keep: set[str]) -> None:
        """Evict the least recently used resident versions but ``keep`` while the budget is exceeded."""
        if not self.budget_bytes:
            return
        while sum(self.resident_bytes().values()) > self.budget_bytes:
            idle = {x.version: x for x in self.slots.values() if x.resident and x.version not in keep}
            if not idle:
                return  # what this batch needs is over the budget alone: run it, evict after
            victim = min(idle.values(), key=lambda x: self.last_used.get(x.version, 0.0))
            for loaded in self.slots.values():
                if loaded.version == victim.version:
                    loaded.backbone = loaded.head = None
            self.events.append(("evict", victim.version, ""))

    def _served(self, item: Item) -> tuple[tuple[str, str], Loaded] | RequestError:
        """What answers ``item``: its model's slot, that model's stable slot once the canary is gone."""
        model = item.model or (self.names[0] if self.names else "")
        for slot in (item.slot, "stable"):
            if (model, slot) in self.slots:
                return (model, slot), self.slots[(model, slot)]
        return NotFound(f"model {model!r} is no longer served", reason="model")

    def run(self, items: list[Item]) -> list[Answer | RequestError]:
        """Answer every item; an item that cannot run gets its own RequestError. An item served by its
        model's stable slot that asks for a shadow also goes through the canary (one more head when the
        canary shares the backbone): its answer carries the canary's version and top class."""
        answers: list[Answer | RequestError] = [RequestError("not run")] * len(items)
        shadows: dict[int, tuple[str, int]] = {}
        self.timings, self.passes, self.decoded = {}, [], 0
        groups: dict[tuple[object, ...], list[Entry]] = {}
        entries: list[Entry] = []
        for i, item in enumerate(items):
            served = self._served(item)
            if isinstance(served, RequestError):
                answers[i] = served
                continue
            (model, slot), loaded = served
            entries.append(Entry(i, model, slot, loaded))
            canary = self.slots.get((model, "canary"))
            if item.shadow and slot == "stable" and canary is not None:
                entries.append(Entry(i, model, "canary", canary, shadow=True))
        self._ensure([entry.loaded for entry in entries])  # evicted versions are loaded again before their pass
        for entry in entries:
            groups.setdefault(entry.loaded.pass_key, []).append(entry)
        for group in groups.values():
            self._one_pass(items, group, answers, shadows)
        for i, shadow in shadows.items():
            answer = answers[i]
            if isinstance(answer, Answer):
                answers[i] = replace(answer, shadow=shadow)
        return answers

    def _one_pass(self, items: list[Item], group: list[Entry], answers: list[Answer | RequestError],
                  shadows: dict[int, tuple[str, int]]) -> None:
        """One backbone pass over ``group`` (items sharing a backbone and a preprocessing; an image that
        two of its versions answer is in it once), each image then through its versions' heads; fills
        ``answers`` and ``shadows``."""
        order = list(dict.fromkeys(entry.item for entry in group))
        batch, errors = self._stack(group[0].loaded.meta, [items[i] for i in order])
        failed = {i: err for i, err in zip(order, errors) if err is not None}
        for entry in group:
            if entry.item in failed and not entry.shadow:
                answers[entry.item] = failed[entry.item]
        rows = {i: row for row, i in enumerate(i for i in order if i not in failed)}
        runs = [entry for entry in group if entry.item in rows]
        if not runs:
            return
        started = time.perf_counter()
        heads = {entry.loaded.version: entry.loaded.head for entry in runs}
        wanted: dict[str, list[int]] = {}
        for entry in runs:
            wanted.setdefault(entry.loaded.version, []).append(rows[entry.item])
        probs = self.forward(runs[0].loaded.backbone, heads, batch, wanted)
        seconds = time.perf_counter() - started
        self.passes.append(BackbonePass(runs[0].loaded.backbone_version, len(rows)))
        taken = dict.fromkeys(wanted, 0)
        for entry in runs:
            version = entry.loaded.version
            row, taken[version] = probs[version][taken[version]], taken[version] + 1
            self.timings[(entry.model, entry.slot)] = seconds
            if entry.shadow:
                shadows[entry.item] = (version, int(np.argmax(row)))
            else:
                answers[entry.item] = _answer(row, entry.loaded, items[entry.item].top_k, entry.slot)

    def forward(self, backbone: Backbone, heads: dict[K, Head], batch: torch.Tensor,
                rows: dict[K, list[int]]) -> dict[K, np.ndarray]:
        """Normalised float batch (B, 3, S, S), on any device, through ``backbone`` once, then the
        ``rows`` of each head -> their softmax probabilities, float32 numpy (len(rows[k]), C_k) per head."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=_DTYPES[self.precision])
            if self.precision != "fp32" else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            logits = heads_forward(backbone, heads, batch, rows)
        return {key: value.float().softmax(dim=-1).cpu().numpy() for key, value in logits.items()}

    def _stack(self, meta: CheckpointMeta, items: list[Item]) -> tuple[torch.Tensor, list[RequestError | None]]:
        """The items as one normalised batch on the device (uint8 images go there before they are
        resized and normalised); an item that cannot join it gets its RequestError. uint8 images are
        normalised together, in one pass over the batch, once stacked."""
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
            elif tuple(image.shape) != (3, size, size):
                errors.append(RequestError(
                    f"PIXELS must be [B,3,{size},{size}] for this model, found {list(image.shape)}", reason="shape"))
                continue
            tensors.append(image)
            errors.append(None)
        if not tensors:
            return torch.empty(0), errors
        if all(t.dtype == torch.uint8 for t in tensors):
            return norm(torch.stack(tensors)), errors
        return torch.stack([norm(t) if t.dtype == torch.uint8 else t for t in tensors]), errors

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
        probs = self.forward(loaded.backbone, {0: loaded.head}, torch.zeros(2, 3, size, size), {0: [0, 1]})[0]
        if probs.shape != (2, loaded.meta.num_classes) or not np.isfinite(probs).all():
            raise ValueError(
                f"warm-up gave {'non-finite outputs' if probs.shape[-1:] == (loaded.meta.num_classes,) else 'shape ' + str(probs.shape)}"
                f" (expected finite (2, {loaded.meta.num_classes}))"
            )
        log.debug("warm-up of %s took %.0f ms", loaded.version, (time.perf_counter() - started) * 1000)


def check_servable(state: dict[str, torch.Tensor], meta: CheckpointMeta, version: str, backbone: str | None = None) -> None:
    """Build ``state`` as a worker would, on the CPU, and warm it up (``backbone``: its backbone version, when
    known). Raises IncompatibleCheckpointError if it does not fit its architecture, ValueError if the warm-up
    gives non-finite or misshapen outputs. The BatchNorm fold is left to the workers: it is kept only where the
    features stay within 1e-5 of the unfolded ones, so it cannot change this verdict, and here it would only
    add two probe passes to every load."""
    Engine(torch.device("cpu"), "fp32", fold=False).prepare(state, meta, version, "candidate", backbone)


def _answer(probs: np.ndarray, loaded: Loaded, top_k: int, slot: str) -> Answer:
    k = max(1, min(top_k, probs.shape[0]))
    order = np.argsort(-probs, kind="stable")[:k]
    top = [(loaded.meta.class_names[i], int(i), float(probs[i])) for i in order]
    return Answer(probs.astype(np.float32), top, loaded.version, slot)
