"""Checks on the CLI's help text, shared by the tests of the verbs."""

from __future__ import annotations

import argparse

from service.cli import build_parser


def subparser(verb: str) -> argparse.ArgumentParser:
    """The parser of ``headswap VERB``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[verb]


def assert_every_option_names_its_default(parser: argparse.ArgumentParser) -> None:
    """Every option's help says its default ("(default: VALUE"), or that the option is required."""
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        text = formatter._expand_help(action)
        if action.required:
            assert text.endswith("; required"), (action.dest, text)
        elif action.default is None:
            assert "(default: none, " in text, (action.dest, text)
        else:
            assert f"(default: {action.default}" in text, (action.dest, text)
