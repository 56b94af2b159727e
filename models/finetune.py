"""Fine-tuning: the seed's transfer-learning loop as a library function.

``finetune(FinetuneConfig(...))`` reads an ImageFolder tree (``train/`` and ``val/``), starts
from scratch, from torchvision weights, or from a previous checkpoint's backbone (its head
left out, a fresh one made for the new classes), trains with the seed's ``"head"`` or
``"all"`` policy, evaluates after every epoch and keeps the best-by-validation checkpoint on
disk, written atomically, so an interrupted run leaves the best one so far.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from models.archs import get_spec
from models.build import build_classifier, recorded_arch_kwargs
from models.checkpoint import SUFFIXES, CheckpointMeta, LoadedCheckpoint, load_checkpoint, save_checkpoint, utc_now
from models.merge import MergeReport, format_report, merge_state, strip_prefixes
from models.policy import POLICIES, TrainPolicy, apply_policy, set_train_mode
from models.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
AUX_LOSS_WEIGHT = 0.3  # the GoogLeNet paper's weight on each auxiliary classifier's loss
# Less than half of a --from checkpoint fitting is a wrong file or architecture, not a transfer.
FROM_MIN_MATCH = 0.5


class DatasetError(ValueError):
    """The data folder is not an ImageFolder tree with matching ``train/`` and ``val/`` splits."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``train="head"`` freezes the backbone (eval mode), ``"all"`` trains it.

    ``weight_decay=None`` takes the optimizer's default; ``num_threads=None`` keeps torch's.
    Construction raises ValueError (UnknownArchitectureError among them) for invalid values.
    """

    arch: str
    data: Path
    out: Path
    from_checkpoint: Path | None = None
    weights: str | None = None
    train: TrainPolicy = "all"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float | None = None
    image_size: int | None = None
    device: str = "auto"
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
                             f"{self.weights!r}: start from a checkpoint file with --from")
        if Path(self.out).suffix not in SUFFIXES:
            raise ValueError(f"{self.out}: checkpoint suffix must be one of {', '.join(SUFFIXES)}")
        for name, value, allowed in (("train", self.train, POLICIES), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, found {value!r}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 0), ("image_size", 16), ("num_threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be at least {low}, found {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, found {self.lr}")


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    images_per_second: float


@dataclass
class FinetuneResult:
    """The best model (CPU, eval mode), the metadata written with it, and the run's history.

    ``version`` is None when no epoch finished (nothing was written).
    """

    model: nn.Module
    meta: CheckpointMeta
    version: str | None
    history: list[EpochStats]
    merge_report: MergeReport | None
    interrupted: bool
    best_val_accuracy: float = field(default=0.0)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; raises ValueError for unavailable CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but torch finds no CUDA device")
    return torch.device(name)


def finetune(config: FinetuneConfig, *, progress: TextIO | None = None) -> FinetuneResult:
    """Run ``config``; returns the result. A progress line per epoch goes to ``progress``.

    KeyboardInterrupt stops training and returns with ``interrupted=True``; the checkpoint
    written so far (the best epoch's) stays as it was. Raises DatasetError, CheckpointError,
    IncompatibleCheckpointError (a ``--from`` checkpoint that does not fit), WeightsUnavailableError.
    """
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        torch.manual_seed(config.seed)  # model init and (with workers=0) augmentation draw from it
        train_set, val_set = load_splits(Path(config.data))
        model, meta, report = _initial_model(config, train_set.classes)
        train_set.transform, val_set.transform = train_transform(meta), eval_transform(meta)
        return _fit(config, device, model, meta, report, (train_set, val_set), progress)
    finally:
        torch.set_num_threads(threads)


def load_splits(data: Path) -> tuple[ImageFolder, ImageFolder]:
    """The ``train`` and ``val`` ImageFolders of ``data``; raises DatasetError unless they match."""
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise DatasetError(str(data / split), "no such folder: expected DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg")
    try:
        train, val = ImageFolder(str(data / "train")), ImageFolder(str(data / "val"))
    except FileNotFoundError as exc:  # a class folder without images
        raise DatasetError(str(data), str(exc)) from None
    if train.classes != val.classes:
        raise DatasetError(str(data / "val"), f"classes {val.classes} differ from train's {train.classes}")
    if len(train.classes) < 2:
        raise DatasetError(str(data / "train"), f"expected at least 2 class folders, found {train.classes}")
    return train, val


def _initial_model(config: FinetuneConfig, classes: list[str]) -> tuple[nn.Module, CheckpointMeta, MergeReport | None]:
    parent = load_checkpoint(config.from_checkpoint) if config.from_checkpoint is not None else None
    same_arch = parent is not None and parent.meta.arch == config.arch
    model = build_classifier(config.arch, len(classes), weights=config.weights,
                             arch_kwargs=parent.meta.arch_kwargs if same_arch else None)
    report = _merge_backbone(model, parent, config.from_checkpoint) if parent is not None else None
    base = parent.meta if same_arch else CheckpointMeta.for_arch(config.arch, classes)
    input_size, resize_size = base.input_size, base.resize_size
    if config.image_size is not None:  # keep the architecture's resize-to-crop ratio
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
    heads = tuple(f"{head}." for head in get_spec(parent.meta.arch).head_modules)
    backbone = {k: v for k, v in strip_prefixes(parent.state).items() if not k.startswith(heads)}
    merged, report = merge_state(model.state_dict(), backbone, min_match=FROM_MIN_MATCH)
    model.load_state_dict(merged)
    log.info("backbone of %s (version %s), fresh head:\n%s", where, parent.version, format_report(report))
    return report


def split_output(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main logits and auxiliary logits of a model's output.

    googlenet and inception_v3 return namedtuples with aux logits in train mode.
    """
    if isinstance(output, torch.Tensor):
        return output, []
    fields = output._asdict()
    return fields["logits"], [v for k, v in fields.items() if k != "logits" and v is not None]


def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy (a fraction) of ``model`` over ``loader``; puts the model in eval mode."""
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    with torch.inference_mode(), _autocast(device):
        for images, targets in loader:
            logits, _ = split_output(model(_to_device(images, device)))
            correct += (logits.argmax(1) == targets.to(device)).sum()
            total += len(targets)
    return correct.item() / max(total, 1)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images


class ProgressBar:
    """One line per epoch on ``stream``: redrawn in place with ``\\r`` on a terminal, ended with a newline.

    Off a terminal (logs, pipes) only the finished line is written. ``stream=None`` writes nothing.
    """

    def __init__(self, stream: TextIO | None, label: str, total: int, *, interval: float = 0.2) -> None:
        self.stream, self.label, self.total, self.interval = stream, label, total, interval
        self.live = stream is not None and stream.isatty()
        self._last = 0.0

    def update(self, done: int, text: Callable[[], str]) -> None:
        """Redraw with ``text()`` if live and due: the callback is only run when drawing."""
        now = time.monotonic()
        if self.live and (now - self._last >= self.interval or done == self.total):
            self._last = now
            self._write("\r" + self._line(done, text()))

    def close(self, done: int, text: str) -> None:
        if self.stream is not None:
            self._write(("\r" if self.live else "") + self._line(done, text) + "\n")

    def _line(self, done: int, text: str) -> str:
        filled = round(20 * done / max(self.total, 1))
        return f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total} {text}"

    def _write(self, text: str) -> None:
        assert self.stream is not None
        self.stream.write(text)
        self.stream.flush()


def _fit(
    config: FinetuneConfig, device: torch.device, model: nn.Module, meta: CheckpointMeta,
    report: MergeReport | None, splits: tuple[ImageFolder, ImageFolder], progress: TextIO | None,
) -> FinetuneResult:
    train_loader, val_loader = _loaders(config, *splits, device)
    params = apply_policy(config.arch, model, config.train)
    if device.type == "cuda":
        model.to(device, memory_format=torch.channels_last)
    optimizer = _optimizer(config, params)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(train_loader))
    history: list[EpochStats] = []
    best: tuple[dict[str, torch.Tensor], str] | None = None  # the best epoch's CPU state and version
    interrupted = False
    try:
        for epoch in range(1, config.epochs + 1):
            bar = ProgressBar(progress, f"epoch {epoch}/{config.epochs}", len(train_loader))
            loss, accuracy, rate = _train_epoch(config, model, train_loader, (optimizer, scheduler), device, bar)
            history.append(EpochStats(epoch, loss, accuracy, evaluate(model, val_loader, device), rate))
            improved = len(history) == 1 or history[-1].val_accuracy > max(s.val_accuracy for s in history[:-1])
            bar.close(len(train_loader), f"{_train_text(loss, accuracy, rate)} | val acc {history[-1].val_accuracy:.1%}"
                      + (" (best, saved)" if improved else ""))
            if improved:  # saved before `best` moves on, so a Ctrl-C mid-write leaves both in step
                state = _cpu_state(model)
                best = state, save_checkpoint(config.out, state, _with_summary(meta, config, history, report, device))
    except KeyboardInterrupt:
        interrupted = True
    if best is not None and not interrupted:  # same tensors, same version: the summary gains the last epochs
        save_checkpoint(config.out, best[0], _with_summary(meta, config, history, report, device))
    model.to("cpu", memory_format=torch.contiguous_format)
    if best is not None:
        model.load_state_dict(best[0])
        meta = _with_summary(meta, config, history, report, device)
    return FinetuneResult(model.eval(), meta, best[1] if best else None, history, report, interrupted,
                          max((s.val_accuracy for s in history), default=0.0))


def _loaders(
    config: FinetuneConfig, train_set: ImageFolder, val_set: ImageFolder, device: torch.device
) -> tuple[DataLoader, DataLoader]:
    # Own generators: shuffling and worker seeds follow config.seed alone, whatever else drew from torch's RNG.
    common: dict[str, Any] = dict(num_workers=config.workers, pin_memory=device.type == "cuda",
                                  persistent_workers=config.workers > 0)
    train = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(config.seed),
                       drop_last=len(train_set) > config.batch_size, **common)  # no 1-image BatchNorm batch
    val = DataLoader(val_set, batch_size=2 * config.batch_size, generator=torch.Generator().manual_seed(config.seed),
                     **common)
    return train, val


def _optimizer(config: FinetuneConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    decay = config.weight_decay if config.weight_decay is not None else DEFAULT_WEIGHT_DECAY[config.optimizer]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=decay)  # the seed's optimizer


def _train_epoch(
    config: FinetuneConfig, model: nn.Module, loader: DataLoader,
    steppers: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], device: torch.device, bar: ProgressBar,
) -> tuple[float, float, float]:
    """One pass over ``loader``; returns mean loss, accuracy and images per second."""
    optimizer, scheduler = steppers
    set_train_mode(config.arch, model, config.train)
    # Sums stay on the device: reading them (.item()) waits for the GPU, so only the bar does, when it draws.
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), 0
    start = time.perf_counter()
    for step, (images, targets) in enumerate(loader, 1):
        images, targets = _to_device(images, device), targets.to(device, non_blocking=True)
        with _autocast(device):
            logits, aux = split_output(model(images))
            loss = nn.functional.cross_entropy(logits, targets)
            for extra in aux:
                loss = loss + AUX_LOSS_WEIGHT * nn.functional.cross_entropy(extra, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
        bar.update(step, lambda: _train_text(loss_sum.item() / seen, correct.item() / seen,
                                             seen / (time.perf_counter() - start)))
    return loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - start)


def _train_text(loss: float, accuracy: float, rate: float) -> str:
    return f"loss {loss:.4f} acc {accuracy:.1%} {rate:.0f} img/s"


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _with_summary(
    meta: CheckpointMeta, config: FinetuneConfig, history: list[EpochStats], report: MergeReport | None,
    device: torch.device,
) -> CheckpointMeta:
    best = max(history, key=lambda s: s.val_accuracy)  # the first epoch of the best accuracy, the one saved
    init = (f"checkpoint:{config.from_checkpoint}" if config.from_checkpoint is not None
            else f"torchvision:{config.weights}" if config.weights is not None else "scratch")
    training = {
        "epochs": len(history), "epochs_planned": config.epochs, "best_epoch": best.epoch,
        "best_val_accuracy": best.val_accuracy, "final_val_accuracy": history[-1].val_accuracy,
        "train_policy": config.train, "init": init, "merge": report.summary() if report is not None else None,
        "optimizer": config.optimizer, "lr": config.lr, "batch_size": config.batch_size, "seed": config.seed,
        "image_size": meta.input_size, "device": device.type, "history": [asdict(s) for s in history],
    }
    return replace(meta, training=training, created_at=utc_now())
