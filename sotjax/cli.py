"""`sotjax` command line: a thin dispatcher over ``sotjax.commands.*``.

Each subcommand module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (jax, models) inside ``run`` so that
``sotjax --help`` is instant. Bad input raises :class:`SotjaxInputError`, which is
printed here as one line with exit code 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from sotjax.errors import SotjaxInputError

# name -> module path. Order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "weigh": "sotjax.commands.weigh",
    "embed": "sotjax.commands.embed",
    "demo": "sotjax.commands.demo",
    "eval": "sotjax.commands.eval",
}

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sotjax",
        description="Optimal-transport sample weighting for safe LLM fine-tuning (SOT push-pull).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_path in SUBCOMMANDS.items():
        module = importlib.import_module(module_path)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except SotjaxInputError as err:
        msg = " ".join(str(err).split())  # one line, always
        print(f"sotjax {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as err:  # a numerical failure, not bad input
        print(f"sotjax {args.command}: error: {err} (try --dtype float64)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sotjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
