"""`udg` command line: one entry point, each package registers its own subcommands.

Handlers import their heavy dependencies lazily so that `udg serve` runs on the serving install (no torch)
and `udg train` never loads the web stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Packages that contribute subcommands, in help order. A package missing from an install is skipped.
COMMAND_MODULES = ("dataset.commands", "model.commands", "export.commands", "service.commands", "pipeline.commands",
                   "loadtest.commands", "docsite.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udg", description="User-Dependent Gating CTR: train, export, serve.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name or name.startswith(f"{error.name}."):  # the module or its package not installed
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
