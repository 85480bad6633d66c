"""The ``reslab`` command: a thin layer that parses arguments and calls library functions.

Each subcommand declares its arguments next to its handler, in the module of its family
(``train``: models, training, fine-tuning; ``use``: evaluation, prediction, embeddings; ``deploy``:
export, quantization, benchmarks; ``lab``: the studies). Options shared by several commands are
declared once in :mod:`reslab.cli.options`; choices come from the ``Literal`` types the library
validates with. Library modules are imported when a command runs, not when the parser is built:
importing torch takes seconds, and ``reslab --help`` should not.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from reslab.cli.options import COMMANDS, Parser
from reslab.errors import ReslabError

FAMILIES = ("train", "use", "deploy", "lab")  # each module registers its commands, in this order in --help
for _family in FAMILIES:
    importlib.import_module(f"reslab.cli.{_family}")

# Library log lines that say nothing to a user of the command line: inductor on a machine without a
# CUDA toolkit ("No CUDA runtime is found"), torchao's pytree registrations, coremltools on Linux
# ("Failed to load _MLModelProxy": it cannot run models there, which reslab says itself).
QUIET_LOGGERS = ("torch.utils.cpp_extension", "torch.utils._pytree", "coremltools")
PIPE_CLOSED = 141  # 128 + SIGPIPE: what Unix tools exit with when a reader such as `head` stops


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed and only ``only`` configured (its arguments added)."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser = Parser(
        prog="reslab",
        description="Deep residual networks: models, training, analysis, deployment.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help, configure in COMMANDS:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        if only == name:
            p.set_defaults(func=configure(p))
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """reslab's own warnings as one ``reslab: warning:`` line; others as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        print(f"reslab: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (already printed on one line)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    warnings.showwarning = _show_warning
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # inside the try: a reader that went away is noticed here
        return code
    except ReslabError as e:
        if debug:
            raise
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `reslab models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except OSError as e:  # a file or folder the user named: say which and why
        if debug:
            raise
        where = e.filename or "a file"
        reason = (
            "a file where a folder is needed" if isinstance(e, FileExistsError | NotADirectoryError) else None
        )
        print(
            f"reslab: error: {where}: {reason or e.strerror or e}; check the path and its permissions",
            file=sys.stderr,
        )
        return 2
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if debug:
            raise
        msg = (str(e).strip().splitlines() or [""])[0]
        print(
            f"reslab: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        warnings.showwarning = _default_showwarning
