"""The ``amgsn`` command line. This module only parses arguments and calls ``amgsn.engine`` /
``amgsn.data``; each sub-command is one ``_add_<name>`` function that registers its parser and
sets ``func`` to a small runner (imports are deferred so ``amgsn --help`` is fast)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amgsn",
        description="AMGSN for facial expression recognition: pre-train (ABMG + MRUS), fine-tune "
        "(CE + debiased center + SupCon), evaluate, export.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS: list = []


def command(fn):
    """Register an ``_add_<name>(subparsers)`` function as a sub-command."""
    _COMMANDS.append(fn)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
