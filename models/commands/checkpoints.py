"""``headswap`` verbs over checkpoints: archs, inspect, merge, slice, convert.

torch and torchvision are imported inside the verbs that build or load tensors: ``archs``
reads the architecture table and ``inspect`` a safetensors header, so both (and every
``--help``) start without them.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from models.archs import ARCHS, get_spec
from models.errors import CheckpointError, UnsafeCheckpointError
from models.meta import CheckpointMeta, utc_now
from models.summary import summarize

if TYPE_CHECKING:
    import torch


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("archs", help="list every supported architecture")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_archs)

    p = sub.add_parser("inspect", help="show a checkpoint's metadata and version")
    p.add_argument("checkpoint")
    p.add_argument("--arch", help="architecture of a bare state_dict")
    p.add_argument("--num-classes", type=int, help="class count of a bare state_dict")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge the fitting tensors of one checkpoint into another")
    p.add_argument("--into", required=True, help="full checkpoint to merge into")
    p.add_argument("--from", dest="source", required=True, help="checkpoint (full or partial) to take tensors from")
    p.add_argument("--out", required=True, help="where to write the merged checkpoint")
    p.add_argument("--min-match", type=float, default=0.0,
                   help="refuse when less than this share of the source's tensors fits (0-1)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("slice", help="write a partial checkpoint with only some tensors")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--head", action="store_true", help="exactly the architecture's head(s)")
    group.add_argument("--include", nargs="+", metavar="GLOB", help="tensor names to keep (fnmatch globs)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="tensor names to drop")
    p.set_defaults(func=cmd_slice)

    p = sub.add_parser("convert", help="re-encode a checkpoint; turn a bare or pickled one into a headswap checkpoint")
    p.add_argument("source")
    p.add_argument("--out", required=True, help=".safetensors (preferred) or .pt")
    p.add_argument("--arch", help="architecture, for files without headswap metadata")
    p.add_argument("--num-classes", type=int, help="class count, for files without headswap metadata")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle a whole model saved with torch.save(model, PATH): this runs code from the file")
    p.set_defaults(func=cmd_convert)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def cmd_archs(args: argparse.Namespace) -> int:
    rows = [{"arch": arch, "head": spec.head, "input_size": spec.input_size, "num_parameters": spec.num_parameters}
            for arch, spec in sorted(ARCHS.items())]
    if args.json:
        _print_json(rows)
    else:
        print(f"{'arch':22} {'head':14} {'input':>5} {'parameters':>13}")
        for r in rows:
            print(f"{r['arch']:22} {r['head']:14} {r['input_size']:5d} {r['num_parameters']:13,d}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = summarize(args.checkpoint, arch=args.arch, num_classes=args.num_classes)
    if args.json:
        _print_json(summary.to_dict())
        return 0
    meta, dtypes = summary.meta, summary.dtypes
    print(f"{args.checkpoint}\n  version      {summary.version}\n  name         {meta.name}")
    print(f"  arch         {meta.arch}{' (partial)' if meta.partial else ''}")
    print(f"  classes      {meta.num_classes}: {', '.join(meta.class_names[:10])}{' ...' if meta.num_classes > 10 else ''}")
    print(f"  parameters   {summary.num_parameters:,d} in {summary.num_tensors} tensors ({', '.join(f'{k}: {v}' for k, v in dtypes.items())})")
    print(f"  input        {meta.input_size}px (resize {meta.resize_size}, {meta.interpolation}), mean {meta.mean}, std {meta.std}")
    print(f"  created      {meta.created_at}  parent {meta.parent_version or '-'}")
    if meta.training:
        print(f"  training     {json.dumps(meta.training)}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from models.checkpoint import load_checkpoint, save_checkpoint
    from models.merge import format_report, merge_state

    target = load_checkpoint(args.into)
    if target.meta.partial:
        raise CheckpointError(args.into, "--into must be a full checkpoint, this one is partial")
    source = load_checkpoint(args.source)
    merged, report = merge_state(target.state, source.state, min_match=args.min_match)
    meta = replace(target.meta, created_at=utc_now(), parent_version=target.version)
    version = save_checkpoint(args.out, merged, meta)
    if args.json:
        _print_json({**report.to_dict(), "version": version, "parent_version": target.version})
    else:
        print(format_report(report))
        print(f"wrote {args.out}: version {version} (parent {target.version})")
    return 0


def cmd_slice(args: argparse.Namespace) -> int:
    from models.build import head_parameter_names, skeleton
    from models.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(args.checkpoint)
    if args.head:
        model = skeleton(loaded.meta.arch, loaded.meta.num_classes, arch_kwargs=loaded.meta.arch_kwargs)
        keep = set(head_parameter_names(loaded.meta.arch, model))
    else:
        keep = {k for k in loaded.state if any(fnmatch.fnmatchcase(k, g) for g in args.include)}
    keep = {k for k in keep if k in loaded.state and not any(fnmatch.fnmatchcase(k, g) for g in args.exclude)}
    if not keep:
        raise CheckpointError(args.checkpoint, "the selection matches no tensor")
    part = {k: loaded.state[k] for k in sorted(keep)}
    meta = replace(loaded.meta, partial=True, created_at=utc_now(), parent_version=loaded.version)
    version = save_checkpoint(args.out, part, meta)
    print(f"wrote {args.out}: {len(part)} of {len(loaded.state)} tensors, version {version}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from models.build import classifier_from_state
    from models.checkpoint import load_checkpoint, load_trusted_pickle, save_checkpoint

    try:
        loaded = load_checkpoint(args.source, arch=args.arch, num_classes=args.num_classes)
        state, meta = loaded.state, loaded.meta
    except UnsafeCheckpointError:
        if not args.trust_pickle:
            raise
        if args.arch is None:
            raise CheckpointError(args.source, "--trust-pickle needs --arch to know what the model is") from None
        state = load_trusted_pickle(args.source)
        num_classes = args.num_classes or _head_width(args.arch, state, args.source)
        meta = CheckpointMeta.for_arch(args.arch, [str(i) for i in range(num_classes)], name=args.arch)
    if not meta.partial:
        classifier_from_state(state, meta, where=args.source)  # refuse what would not serve
    version = save_checkpoint(args.out, state, meta)
    print(f"wrote {args.out}: {meta.arch}, {meta.num_classes} classes, version {version}")
    return 0


def _head_width(arch: str, state: dict[str, torch.Tensor], where: str) -> int:
    key = f"{get_spec(arch).head}.weight"
    if key not in state:
        raise CheckpointError(where, f"no {key} to read the class count from; pass --num-classes")
    return int(state[key].shape[0])
