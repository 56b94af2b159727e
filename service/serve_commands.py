"""The ``serve`` verb."""

from __future__ import annotations

import argparse

from service import settings as settings_module


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over HTTP (/predict and KServe V2)")
    settings_module.add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import shutil

    from service.observability.multiproc import metrics_dir

    settings = settings_module.from_sources(args)
    folder, owned = metrics_dir()  # before prometheus_client is imported
    try:
        from service.server import serve  # imports LitServe, FastAPI and prometheus_client only when serving

        return serve(settings)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
