"""CLI verbs that make checkpoints: demo-data, finetune."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.demo_data import TASKS, write_demo_data
from models.finetune import DEVICES, OPTIMIZERS, FinetuneConfig, finetune
from models.policy import POLICIES


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="write a built-in image task as an ImageFolder tree (OUT/train, OUT/val)")
    p.add_argument("out")
    p.add_argument("--task", choices=sorted(TASKS), default="shapes",
                   help="shapes, or glyphs: a second task that a shapes backbone gives a head start on")
    p.add_argument("--per-class", type=int, default=200, help="training images per class (val: a quarter, at least 10)")
    p.add_argument("--size", type=int, default=64, metavar="PX", help="image width and height")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("finetune", help="train a classifier on an ImageFolder tree (DATA/train, DATA/val)")
    p.add_argument("--arch", required=True, help="architecture (see `headswap archs`)")
    p.add_argument("--data", required=True, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--out", required=True, help="checkpoint to write (.safetensors or .pt): the best epoch's")
    p.add_argument("--from", dest="from_checkpoint", metavar="CKPT",
                   help="start from this checkpoint's backbone, with a fresh head for the new classes")
    p.add_argument("--weights", metavar="NAME", help="start from torchvision weights (DEFAULT, IMAGENET1K_V1, ...)")
    p.add_argument("--train", choices=POLICIES, default="all",
                   help="head: only the classification head (backbone frozen); all: every parameter")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (cosine decay to zero)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="sgd: momentum 0.9, as the seed")
    p.add_argument("--image-size", type=int, metavar="PX", help="input crop size (default: the architecture's)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: load in the training process)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_finetune)


def cmd_demo_data(args: argparse.Namespace) -> int:
    data = write_demo_data(args.out, task=args.task, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {data.root}: {data.task}, {len(data.classes)} classes ({', '.join(data.classes)}), "
          f"{data.train_per_class} train + {data.val_per_class} val images each, {data.size}px")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    config = FinetuneConfig(
        arch=args.arch, data=Path(args.data), out=Path(args.out),
        from_checkpoint=Path(args.from_checkpoint) if args.from_checkpoint else None, weights=args.weights,
        train=args.train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        image_size=args.image_size, device=args.device, workers=args.workers, seed=args.seed,
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
