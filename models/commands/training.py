"""``headswap`` verbs that make checkpoints: demo-data, finetune.

The parsers are built from torch-free modules (``models.recipe``, ``models.demo_data``), so
``--help`` answers at once; ``finetune`` imports torch and torchvision when it runs. Every
option's help names its default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.demo_data import TASKS, write_demo_data
from models.recipe import (
    AUTO,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_OPTIMIZER,
    DEFAULT_WEIGHT_DECAY,
    DEVICES,
    OPTIMIZERS,
    POLICIES,
    SGD_MOMENTUM,
    describe_auto_lr,
)


def _auto_or(kind: type) -> object:
    """An argparse type: ``auto`` or a value of ``kind``."""

    def parse(text: str) -> object:
        return AUTO if text == AUTO else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write a built-in image task as an ImageFolder tree (OUT/train, OUT/val)")
    p.add_argument("out", help="folder to write (train/<class>/*.jpg, val/<class>/*.jpg)")
    p.add_argument("--task", choices=sorted(TASKS), default="shapes",
                   help="shapes, or glyphs: a second task that a shapes backbone gives a head start on "
                        "(default: %(default)s)")
    p.add_argument("--per-class", type=int, default=200,
                   help="training images per class; val gets a quarter, at least 10 (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, metavar="PX", help="image width and height (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default: %(default)s)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "finetune", help="train a classifier on an ImageFolder tree (DATA/train, DATA/val)",
        epilog=f"The seed's recipe: --optimizer sgd --lr 0.001 (momentum {SGD_MOMENTUM}), with --train head "
               "--weights DEFAULT for its head-only fine-tune.",
    )
    p.add_argument("--arch", required=True, help="architecture (see `headswap archs`); required")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*; required")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors or .pt): the best epoch's; required")
    p.add_argument("--from", dest="from_checkpoint", metavar="CKPT",
                   help="start from this checkpoint's backbone, with a fresh head for the new classes "
                        "(default: none, from scratch)")
    p.add_argument("--weights", metavar="NAME",
                   help="start from torchvision weights: DEFAULT, IMAGENET1K_V1, ... (default: none, from scratch)")
    p.add_argument("--train", choices=POLICIES, default="all",
                   help="head: only the classification head (backbone frozen); all: every parameter "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="passes over the training images "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per step (default: %(default)s)")
    p.add_argument("--lr", type=_auto_or(float), default=AUTO,
                   help=f"peak learning rate, after a warm-up over the first tenth of the steps and before a cosine "
                        f"decay to zero (default: %(default)s: {describe_auto_lr()}, by --train and the start; "
                        "pretrained: from --from or --weights)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                   help=f"adamw (weight decay {DEFAULT_WEIGHT_DECAY['adamw']:g}) or sgd (momentum {SGD_MOMENTUM}, "
                        f"weight decay {DEFAULT_WEIGHT_DECAY['sgd']:g}, as the seed) (default: %(default)s)")
    p.add_argument("--image-size", type=_auto_or(int), default=AUTO, metavar="PX",
                   help="input crop size (default: %(default)s: the training images' size, at most the architecture's "
                        "input size and at least the smallest it trains on; pass 224 for a 224-pixel network on "
                        "smaller images)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA when available, else the CPU (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="data-loading processes; 0 loads in the training process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="initialisation, augmentation and shuffling; on a CPU the same seed gives the same "
                        "weights (default: %(default)s)")
    p.set_defaults(func=cmd_finetune)


def cmd_demo_data(args: argparse.Namespace) -> int:
    data = write_demo_data(args.out, task=args.task, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {data.root}: {data.task}, {len(data.classes)} classes ({', '.join(data.classes)}), "
          f"{data.train_per_class} train + {data.val_per_class} val images each, {data.size}px")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from models.finetune import FinetuneConfig, finetune  # torch and torchvision: only when training

    config = FinetuneConfig(
        arch=args.arch, data=Path(args.data), out=Path(args.out),
        from_checkpoint=Path(args.from_checkpoint) if args.from_checkpoint else None, weights=args.weights,
        train=args.train, epochs=args.epochs, batch_size=args.batch_size,
        lr=None if args.lr == AUTO else args.lr, optimizer=args.optimizer,
        image_size=None if args.image_size == AUTO else args.image_size, device=args.device, workers=args.workers,
        seed=args.seed,
    )
    result = finetune(config, progress=sys.stderr)
    training = result.meta.training
    if result.version is None:
        print("headswap: interrupted before the first epoch ended; nothing written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: version {result.version}, best val accuracy {result.best_val_accuracy:.1%} "
          f"(epoch {training['best_epoch']} of {training['epochs']}), parent {result.meta.parent_version or '-'}")
    if result.interrupted:
        print(f"headswap: interrupted; {args.out} holds the best epoch so far", file=sys.stderr)
        return 130
    return 0
