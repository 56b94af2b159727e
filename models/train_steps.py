"""One fine-tuning step at a time: optimizer, learning-rate schedule, a training epoch, evaluation."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.policy import set_train_mode
from models.progress import Estimate, ProgressBar
from models.recipe import DEFAULT_WEIGHT_DECAY, SGD_MOMENTUM, OptimizerName

AUX_LOSS_WEIGHT = 0.3  # the GoogLeNet paper's weight on each auxiliary classifier's loss


def make_optimizer(name: OptimizerName, params: list[nn.Parameter], *, lr: float,
                   weight_decay: float | None) -> torch.optim.Optimizer:
    """AdamW or the seed's SGD with momentum; ``weight_decay`` None: the optimizer's default."""
    decay = weight_decay if weight_decay is not None else DEFAULT_WEIGHT_DECAY[name]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=decay)  # the seed's optimizer


def make_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first tenth of the steps, then cosine decay to zero, per step."""
    warmup = max(1, steps // 10)  # without it, resnet18 from scratch sat near chance for epochs here

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_epoch(
    arch: str, policy: str, model: nn.Module, loader: DataLoader,
    steppers: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler], device: torch.device,
    bar: ProgressBar, estimate: Estimate | None = None,
) -> tuple[float, float, float]:
    """One pass over ``loader``; returns mean loss, accuracy and images per second.

    ``estimate``, on the first epoch, is told of every step and prints the run's expected time.
    """
    optimizer, scheduler = steppers
    set_train_mode(arch, model, policy)
    # Sums stay on the device: reading one (.item()) waits for the GPU, so only a drawing bar does.
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
        if estimate is not None:
            estimate.step(step, len(targets), bar, device)
        bar.update(step, lambda: train_text(loss_sum.item() / seen, correct.item() / seen,
                                             seen / (time.perf_counter() - start)))
    return loss_sum.item() / seen, correct.item() / seen, seen / (time.perf_counter() - start)


def split_output(output: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main and auxiliary logits: googlenet and inception_v3 return namedtuples in train mode."""
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


def train_text(loss: float, accuracy: float, rate: float) -> str:
    return f"loss {loss:.4f} acc {accuracy:.1%} {rate:.0f} img/s"
