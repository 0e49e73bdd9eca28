"""The `qcgate` command line.

Each area has its sub-commands in one module of ``qcgate.commands`` with a
``register(subparsers)`` function; this module only collects them, so adding a
command never means editing someone else's code. Command modules import their
heavy dependencies inside the handlers, so ``qcgate --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from qcgate import __version__
from qcgate.errors import QcgateError

# Modules that contribute sub-commands, in the order they appear in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "qcgate.commands.node",
    "qcgate.commands.store",
    "qcgate.commands.users",
    "qcgate.commands.review",
    "qcgate.commands.science",
    "qcgate.commands.pipeline",
    "qcgate.commands.predictors",
    "qcgate.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="qcgate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qcgate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn every expected failure into one message and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except QcgateError as exc:
        print(f"qcgate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
