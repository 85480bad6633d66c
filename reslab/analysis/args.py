"""The command-line options the studies share."""

from __future__ import annotations

import argparse

from reslab.config import NON_NEGATIVE, add_device_option, arg_type, choices, key_type


def add_common_args(
    p: argparse.ArgumentParser, study: str, *, data: str | None = None, seed: bool = True
) -> None:
    """``--out``, ``--no-progress``, ``--device``; ``--data``/``--data-dir`` when the study reads data
    (``data`` says which by default); ``--seed``."""
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"study folder (default runs/analyze-{study}-ID, one per inputs and options)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_device_option(p)
    if data is not None:
        p.add_argument("--data", choices=choices(key_type("data.name")), help=f"default: {data}")
        p.add_argument("--data-dir", metavar="DIR", help="a dataset folder (implies --data folder)")
    if seed:
        p.add_argument("--seed", type=arg_type(int, NON_NEGATIVE), default=0)


def add_checkpoint_args(p: argparse.ArgumentParser, help: str = "one or more checkpoints") -> None:
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT", help=help)
    p.add_argument("--model", help="architecture of bare state dicts (reslab checkpoints name their own)")
