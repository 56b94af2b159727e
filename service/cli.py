"""The ``headswap`` command line: one parser, one place that turns errors into exit codes.

The verbs over checkpoints and training live next to what they drive (``models/commands/``);
``serve`` is the service's own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from models.commands import checkpoints, training
from models.errors import WeightsUnavailableError
from service import serve_commands

# What a user can cause and fix (a bad file, option value or architecture name, a missing file or
# folder, an unreachable download): one line, no traceback. Every other exception is a bug and
# shows as one. The project's own errors subclass these (CheckpointError, UnknownArchitectureError,
# IncompatibleCheckpointError and DatasetError are ValueErrors). WeightsUnavailableError is named
# alone: a RuntimeError from torch is a bug, not the user's.
USER_ERRORS = (ValueError, OSError, WeightsUnavailableError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headswap", description="Fine-tune, inspect, merge and serve torchvision classifiers."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    checkpoints.add_parsers(sub)
    serve_commands.add_parsers(sub)
    training.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a CLI verb. User errors print one line to stderr (no traceback unless --debug)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `headswap archs | head`: the reader left, nothing to report
        return 0
    except KeyboardInterrupt:
        print("headswap: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        print(f"headswap: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
