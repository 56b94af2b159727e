"""The ``serve`` verb."""

from __future__ import annotations

import argparse

from service import settings as settings_module


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (/predict and KServe V2)")
    settings_module.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.serve import serve  # imports LitServe and FastAPI only when serving

    return serve(settings_module.from_sources(args))
