"""The `gradleak` command: parses, calls an experiment, prints.

One module per command (attack, reproduce, text, defend, train, audit); this one builds the
parser from them and turns every user error into one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from gradleak import __version__
from gradleak.cli import attack, audit, defend, reproduce, text, train
from gradleak.cli.common import EXIT_USAGE, Parser, fail
from gradleak.errors import GradleakError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gradleak",
        description="What does the gradient you share in federated learning give away?",
    )
    parser.add_argument("--version", action="version", version=f"gradleak {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in (attack, reproduce, text, defend, train, audit):
        module.add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # quoted in reports
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(stderr=False)
    try:
        args.handler(args, console)
    except GradleakError as error:
        fail(str(error))
    except KeyboardInterrupt:
        print("gradleak: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
