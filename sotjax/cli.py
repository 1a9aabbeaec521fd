"""`sotjax` command line: a thin dispatcher over ``sotjax.commands.*``.

Each subcommand module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (jax, models) inside ``run`` so that
``sotjax --help`` is instant. Every failure the user can meet ends in one line on stderr, never a
traceback:

=====================================================  =========
bad input (:class:`SotjaxInputError`)                   exit 2
an output that cannot be written, disk full, an OS      exit 1
error naming a path (:class:`SotjaxRuntimeError`,
:class:`OSError`), a numerical failure
(:class:`FloatingPointError`), memory exhausted
Ctrl-C                                                  exit 130
=====================================================  =========

Outputs are written through :mod:`sotjax.atomic`, so any of these leaves no partial output.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from sotjax.errors import SotjaxInputError, SotjaxRuntimeError, SotjaxWarning

# name -> module path. Order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "weigh": "sotjax.commands.weigh",
    "embed": "sotjax.commands.embed",
    "demo": "sotjax.commands.demo",
    "eval": "sotjax.commands.eval",
    "bench": "sotjax.commands.bench",
    "finetune": "sotjax.commands.finetune",
    "export": "sotjax.commands.export",
    "audit": "sotjax.commands.audit",
    "score": "sotjax.commands.score",
}

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sotjax",
        description="Optimal-transport sample weighting for safe LLM fine-tuning (SOT push-pull).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_path in SUBCOMMANDS.items():
        module = importlib.import_module(module_path)
        formatter = getattr(module, "FORMATTER", argparse.HelpFormatter)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=formatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _os_error_line(err: OSError) -> str:
    where = err.filename if err.filename is not None else None
    what = err.strerror or _one_line(err) or type(err).__name__
    return f"{where}: {what}" if where is not None else what


def _exit_now(code: int) -> None:
    """Leave at once, without interpreter teardown.

    After a KeyboardInterrupt lands inside JAX, XLA's runtime threads may still be running; letting
    Python finalise modules under them crashed with SIGSEGV in about half of the interrupted runs.
    Everything the job wrote is already finalised or removed by the atomic writers' ``finally``
    blocks at this point, so only the standard streams need flushing.
    """
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe must not turn an exit into a traceback
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"sotjax {args.command}: error:"
    show_warning = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SotjaxWarning):
            print(f"sotjax {args.command}: warning: {_one_line(message)}", file=sys.stderr)
        else:
            show_warning(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line_warning
    try:
        return int(args._run(args) or 0)
    except SotjaxInputError as err:
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SotjaxRuntimeError as err:
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except FloatingPointError as err:  # a numerical failure, not bad input; the message says what to try
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except MemoryError:
        print(f"{prefix} out of memory (host); use a smaller input or a machine with more memory", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:  # disk full, permission denied, ... on a path the job had to write or read
        print(f"{prefix} {_one_line(_os_error_line(err))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"sotjax {args.command}: interrupted; the output was not written", file=sys.stderr)
        if argv is None:  # the console script: leave without teardown (see _exit_now)
            _exit_now(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
