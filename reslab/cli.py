"""The ``reslab`` command: a thin layer that parses arguments and calls library functions.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from reslab.errors import ReslabError

Handler = Callable[[argparse.Namespace], int | None]
Configure = Callable[[argparse.ArgumentParser], Handler]
_COMMANDS: list[tuple[str, str, Configure]] = []


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a subcommand: the decorated function adds its arguments and returns its handler."""

    def wrap(configure: Configure) -> Configure:
        _COMMANDS.append((name, help, configure))
        return configure

    return wrap


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


@command("models", "list the registered models with parameters and GFLOPs")
def _models(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*'")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")

    def run(args: argparse.Namespace) -> int:
        from reslab.complexity import model_stats
        from reslab.models import list_models

        names = list_models(args.pattern)
        if not names:
            raise ReslabError(f"no model matches {args.pattern!r} (`reslab models` lists them all)")
        stats = [model_stats(n) for n in names]
        if args.json:
            print(json.dumps(stats, indent=1))
            return 0
        for s in stats:
            s["params_m"] = f"{s['params'] / 1e6:.2f}M"
            s["gflops_s"] = f"{s['gflops']:.2f}"
            s["input"] = "x".join(map(str, s["input_size"]))
        print(
            format_table(
                stats,
                [
                    ("name", "model"),
                    ("family", "family"),
                    ("layers", "layers"),
                    ("params_m", "params"),
                    ("gflops_s", "GFLOPs"),
                    ("input", "input"),
                ],
            )
        )
        print("\nGFLOPs: multiply-adds for one image at the input size, counted by running the model.")
        return 0

    return run


@command("info", "show a model's architecture by stage")
def _info(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model")

    def run(args: argparse.Namespace) -> int:
        from reslab.complexity import model_stats, stage_table
        from reslab.models import get_model_entry

        entry = get_model_entry(args.model)
        stats = model_stats(args.model)
        spec = entry.spec
        print(
            f"{args.model}: {entry.family}, {stats['layers']} layers, {stats['params'] / 1e6:.2f}M params, "
            f"{stats['gflops']:.2f} GFLOPs at {'x'.join(map(str, spec.input_size))}"
        )
        print(f"  {entry.paper}")
        shortcut = {
            "none": "none (plain network)",
            "A": "A (zero-pad)",
            "B": "B (project on shape change)",
            "C": "C (project everywhere)",
            "D": "D (avg-pool + project)",
        }[spec.shortcut]
        print(
            f"  block {spec.block}, stem {spec.stem}, shortcut {shortcut}"
            + (", pre-activation" if spec.preact else "")
            + (f", groups {spec.groups}x{spec.base_width}d" if spec.groups > 1 else "")
            + (f", attention {spec.attn}" if spec.attn else "")
        )
        rows = stage_table(args.model)
        for r in rows:
            r["output"] = "x".join(map(str, r["output"]))
            r["params"] = f"{r['params'] / 1e6:.3f}M"
        print(
            format_table(
                rows,
                [
                    ("stage", "stage"),
                    ("blocks", "blocks"),
                    ("widths", "branch widths"),
                    ("stride", "stride"),
                    ("output", "output CxHxW"),
                    ("params", "params"),
                ],
            )
        )
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )
    parser = argparse.ArgumentParser(
        prog="reslab",
        description="Deep residual networks: models, training, analysis, deployment.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help, configure in _COMMANDS:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=configure(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        return args.func(args) or 0
    except ReslabError as e:
        if debug:
            raise
        print(f"reslab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an environment problem: still one line unless --debug
        if debug:
            raise
        msg = (str(e).strip().splitlines() or [""])[0]
        print(
            f"reslab: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
