"""Fine-tuning: the seed's transfer-learning loop as a library function.

``finetune(FinetuneConfig(...))`` reads an ImageFolder tree (``train/`` and ``val/``), starts
from scratch, from torchvision weights, or from a previous checkpoint's backbone (its head
left out, a fresh one made for the new classes), trains with the seed's ``"head"`` or
``"all"`` policy, evaluates after every epoch and keeps the best-by-validation checkpoint on
disk, written atomically, so an interrupted run leaves the best one so far. The defaults and
their ``"auto"`` rules live in ``models/recipe.py``; a run states what they resolved to
before it trains, and its expected duration after the first batches.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from models.archs import get_spec
from models.build import build_classifier, recorded_arch_kwargs
from models.checkpoint import SUFFIXES, CheckpointMeta, LoadedCheckpoint, load_checkpoint, save_checkpoint, utc_now
from models.dataset import SingleThreaded, images_side, load_splits
from models.device import resolve_device
from models.errors import IncompatibleCheckpointError
from models.merge import MergeReport, format_report, merge_state, strip_prefixes
from models.policy import apply_policy
from models.progress import Estimate, ProgressBar, write
from models.recipe import (  # noqa: F401 -- OPTIMIZERS, DEVICES, DEFAULT_WEIGHT_DECAY: importable from here too
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_OPTIMIZER,
    DEFAULT_WEIGHT_DECAY,
    DEVICES,
    IMAGE_SIZE_SAMPLE,
    OPTIMIZERS,
    POLICIES,
    SGD_MOMENTUM,
    DeviceName,
    OptimizerName,
    TrainPolicy,
    auto_image_size,
    auto_lr,
    check_image_size,
)
from models.train_steps import evaluate, make_optimizer, make_schedule, train_epoch, train_text
from models.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

FROM_MIN_MATCH = 0.5  # less than half of a --from checkpoint fitting is a wrong file, not a transfer

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``train="head"`` freezes the backbone (eval mode), ``"all"`` trains it.

    ``lr`` is the peak of a warm-up-then-cosine schedule, ``None`` for ``recipe.auto_lr`` (by
    optimizer and start); ``weight_decay=None`` takes the optimizer's default; ``image_size=None``
    follows the training images (``recipe.auto_image_size``); ``num_threads=None`` keeps torch's
    intra-op thread count (one per core). Construction raises ValueError
    (UnknownArchitectureError among them).
    """

    arch: str
    data: Path
    out: Path
    from_checkpoint: Path | None = None
    weights: str | None = None
    train: TrainPolicy = "all"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float | None = None
    optimizer: OptimizerName = DEFAULT_OPTIMIZER
    weight_decay: float | None = None
    image_size: int | None = None
    device: DeviceName = "auto"
    workers: int = 0
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        get_spec(self.arch)
        if self.from_checkpoint is not None and self.weights is not None:
            raise ValueError(f"start from a checkpoint or from torchvision weights, not both "
                             f"(found {str(self.from_checkpoint)!r} and {self.weights!r})")
        if self.weights is not None and Path(self.weights).suffix in SUFFIXES:
            raise ValueError(f"weights takes a torchvision weights name such as DEFAULT, found the file "
                             f"{self.weights!r}: start from a checkpoint with --from")
        if Path(self.out).suffix not in SUFFIXES:
            raise ValueError(f"{self.out}: checkpoint suffix must be one of {', '.join(SUFFIXES)}")
        for name, allowed in (("train", POLICIES), ("optimizer", OPTIMIZERS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, found {getattr(self, name)!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("image_size", 16), ("num_threads", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, found {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, found {self.lr}")
        if self.image_size is not None:
            check_image_size(self.arch, self.image_size)

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from learned weights (``--from`` or ``--weights``)."""
        return self.from_checkpoint is not None or self.weights is not None

    def resolved(self, image_side: int) -> FinetuneConfig:
        """This config with its ``None`` lr and image size resolved (the images' shorter side: ``image_side``)."""
        return replace(
            self,
            lr=self.lr if self.lr is not None else auto_lr(self.optimizer, pretrained=self.pretrained, train=self.train),
            image_size=self.image_size if self.image_size is not None else auto_image_size(self.arch, image_side),
        )


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    images_per_second: float


@dataclass
class FinetuneResult:
    """The best epoch's model (CPU, eval mode) and metadata, and the run's history.

    ``version`` is that of the checkpoint written, None when no epoch finished (nothing written).
    """

    model: nn.Module
    meta: CheckpointMeta
    version: str | None
    history: list[EpochStats]
    merge_report: MergeReport | None
    interrupted: bool

    @property
    def best_val_accuracy(self) -> float:
        return max((s.val_accuracy for s in self.history), default=0.0)


def finetune(config: FinetuneConfig, *, progress: TextIO | None = None) -> FinetuneResult:
    """Run ``config``; returns the result. A progress line per epoch goes to ``progress``.

    Seeds torch's global RNG with ``config.seed``: on the CPU the same config gives the same
    weights. KeyboardInterrupt stops training and returns with ``interrupted=True``; the
    checkpoint written so far (the best epoch's) stays as it was. Raises DatasetError,
    CheckpointError, IncompatibleCheckpointError (a ``from_checkpoint`` that does not fit),
    WeightsUnavailableError.
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)  # model init and (with workers=0) augmentation draw from it
    train_set, val_set = load_splits(Path(config.data))
    image_side = images_side(train_set)
    chosen = config
    config = config.resolved(image_side)
    model, meta, report = _initial_model(config, train_set.classes)
    train_set.transform = SingleThreaded(train_transform(meta))
    val_set.transform = SingleThreaded(eval_transform(meta))
    threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads or threads)
    try:
        loaders = _loaders(config, train_set, val_set, device)
        write(progress, describe_run(chosen, config, image_side, device, len(train_set), len(loaders[0])) + "\n")
        return _fit(config, device, model, meta, report, loaders, progress)
    finally:  # a library call leaves the process's thread count as it found it
        torch.set_num_threads(threads)


def describe_run(
    chosen: FinetuneConfig, config: FinetuneConfig, image_side: int, device: torch.device, images: int, batches: int,
) -> str:
    """One line on what the run does, ``auto`` values resolved: ``chosen`` as given, ``config`` resolved."""
    start = (f"the backbone of {chosen.from_checkpoint}" if chosen.from_checkpoint is not None
             else f"torchvision weights {chosen.weights}" if chosen.weights is not None else "scratch")
    lr = f"lr {config.lr:g}" + (" (auto)" if chosen.lr is None else "")
    size = f"{config.image_size}px inputs" + (f" (auto: images {image_side}px)" if chosen.image_size is None else "")
    decay = config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer]
    return (f"{config.arch} from {start}, training {config.train}: {config.optimizer} {lr}, weight decay {decay:g}, "
            f"{size}, {config.epochs} epochs of {batches} batches ({images} images), {device.type}")


def _initial_model(config: FinetuneConfig, classes: list[str]) -> tuple[nn.Module, CheckpointMeta, MergeReport | None]:
    parent = load_checkpoint(config.from_checkpoint) if config.from_checkpoint is not None else None
    same_arch = parent is not None and parent.meta.arch == config.arch
    kwargs = dict(parent.meta.arch_kwargs) if same_arch else {}
    model = build_classifier(config.arch, len(classes), weights=config.weights, arch_kwargs=kwargs)
    if config.image_size is not None and recorded_arch_kwargs(config.arch, model).get("image_size") not in (
        None, config.image_size,
    ):  # a ViT is built for one input size: build it again for this one (no arch-probing build for the rest)
        kwargs["image_size"] = config.image_size
        model = build_classifier(config.arch, len(classes), weights=config.weights, arch_kwargs=kwargs)
    report = _merge_backbone(model, parent, config.from_checkpoint) if parent is not None else None
    base = parent.meta if same_arch else CheckpointMeta.for_arch(config.arch, classes)  # preprocessing
    input_size, resize_size = base.input_size, base.resize_size
    if config.image_size is not None:  # keep the resize-to-crop ratio
        input_size, resize_size = config.image_size, round(config.image_size * base.resize_size / base.input_size)
    meta = CheckpointMeta.for_arch(
        config.arch, classes, input_size=input_size, resize_size=resize_size, interpolation=base.interpolation,
        mean=list(base.mean), std=list(base.std), name=Path(config.out).stem,
        parent_version=parent.version if parent is not None else None,
        arch_kwargs=recorded_arch_kwargs(config.arch, model),
    )
    return model, meta, report


def _merge_backbone(model: nn.Module, parent: LoadedCheckpoint, where: Path | None) -> MergeReport:
    # The parent's head(s) are left out even where their shapes fit: the new classes get a fresh head.
    spec = get_spec(parent.meta.arch)
    backbone = {k: v for k, v in strip_prefixes(parent.state).items() if not spec.is_head_key(k)}
    try:
        merged, report = merge_state(model.state_dict(), backbone, min_match=FROM_MIN_MATCH)
    except IncompatibleCheckpointError as exc:
        raise IncompatibleCheckpointError(f"{where} ({parent.meta.arch}) does not fit: {exc}", exc.report) from None
    model.load_state_dict(merged)
    log.info("backbone of %s (version %s), fresh head:\n%s", where, parent.version, format_report(report))
    return report


def _loaders(
    config: FinetuneConfig, train_set: ImageFolder, val_set: ImageFolder, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    # Own generators: shuffling and worker seeds follow config.seed alone.
    common: dict[str, Any] = dict(num_workers=config.workers, pin_memory=device.type == "cuda",
                                  persistent_workers=config.workers > 0)
    train = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(config.seed),
                       drop_last=len(train_set) > config.batch_size, **common)  # no 1-image BatchNorm batch
    val = DataLoader(val_set, batch_size=2 * config.batch_size, generator=torch.Generator().manual_seed(config.seed),
                     **common)
    return train, val


def _fit(
    config: FinetuneConfig, device: torch.device, model: nn.Module, meta: CheckpointMeta,
    report: MergeReport | None, loaders: tuple[DataLoader, DataLoader], progress: TextIO | None,
) -> FinetuneResult:
    assert config.lr is not None  # resolved before training
    optimizer = make_optimizer(config.optimizer, apply_policy(config.arch, model, config.train), lr=config.lr,
                               weight_decay=config.weight_decay)
    scheduler = make_schedule(optimizer, config.epochs * len(loaders[0]))
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.preserve_format)
    history: list[EpochStats] = []
    best: _Saved | None = None
    estimate = Estimate(config.epochs, len(loaders[0]), len(loaders[1].dataset))  # type: ignore[arg-type]
    try:
        for epoch in range(1, config.epochs + 1):
            bar = ProgressBar(progress, f"epoch {epoch}/{config.epochs}", len(loaders[0]))
            loss, accuracy, rate = train_epoch(config.arch, config.train, model, loaders[0], (optimizer, scheduler), device, bar,
                                                estimate if epoch == 1 else None)
            val_accuracy = evaluate(model, loaders[1], device)
            history.append(EpochStats(epoch, round(loss, 6), accuracy, val_accuracy, round(rate, 1)))
            improved = best is None or val_accuracy > best.meta.training["best_val_accuracy"]
            bar.close(f"{train_text(loss, accuracy, rate)} | val acc {val_accuracy:.1%}"
                      + (" (best, saved)" if improved else ""))
            if improved:  # `best` moves once the file is written: a Ctrl-C mid-write leaves both as they were
                best = _save(config.out, _cpu_state(model), _with_summary(meta, config, history, report, device))
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
        if best is not None and best.meta.training["epochs"] < len(history):  # same tensors, same version:
            best = _save(config.out, best.state, _with_summary(meta, config, history, report, device))  # + epochs
    model.to("cpu", memory_format=torch.contiguous_format)
    if best is None:
        return FinetuneResult(model.eval(), meta, None, history, report, interrupted)
    model.load_state_dict(best.state)
    return FinetuneResult(model.eval(), best.meta, best.version, history, report, interrupted)


class _Saved(NamedTuple):
    state: State
    version: str
    meta: CheckpointMeta


def _save(path: Path, state: State, meta: CheckpointMeta) -> _Saved:
    return _Saved(state, save_checkpoint(path, state, meta), meta)


def _cpu_state(model: nn.Module) -> State:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _with_summary(
    meta: CheckpointMeta, config: FinetuneConfig, history: list[EpochStats], report: MergeReport | None,
    device: torch.device,
) -> CheckpointMeta:
    best = max(history, key=lambda s: s.val_accuracy)  # the first epoch of the best accuracy: the one saved
    init = (f"checkpoint:{config.from_checkpoint}" if config.from_checkpoint is not None
            else f"torchvision:{config.weights}" if config.weights is not None else "scratch")
    training = {
        "epochs": len(history), "epochs_planned": config.epochs, "best_epoch": best.epoch,
        "best_val_accuracy": best.val_accuracy, "final_val_accuracy": history[-1].val_accuracy,
        "train_policy": config.train, "init": init, "merge": report.summary() if report is not None else None,
        "optimizer": config.optimizer, "lr": config.lr, "batch_size": config.batch_size, "seed": config.seed,
        "weight_decay": config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer],
        "image_size": meta.input_size, "device": device.type, "history": [asdict(s) for s in history],
    }
    return replace(meta, training=training, created_at=utc_now())
