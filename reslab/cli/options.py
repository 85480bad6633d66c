"""What the commands share: registration, one-line usage errors, flags bound to config keys, the
options several commands take (data, device, precision, checkpoints), and table formatting."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from reslab.config import (
    FinetuneConfig,
    Precision,
    TrainConfig,
    base_type,
    choices,
    data_name,
    key_type,
    one_budget,
    parse_override,
    parse_value,
)

Handler = Callable[[argparse.Namespace], int | None]
Configure = Callable[[argparse.ArgumentParser], Handler]
COMMANDS: list[tuple[str, str, Configure]] = []


def command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Register a subcommand: the decorated function adds its arguments and returns its handler."""

    def wrap(configure: Configure) -> Configure:
        COMMANDS.append((name, help, configure))
        return configure

    return wrap


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other reslab failure."""

    def error(self, message: str) -> None:
        self.exit(2, f"reslab: error: {self.prog}: {message} (see {self.prog} --help)\n")


# --- flags bound to config keys ---------------------------------------------------------------

TRAIN, FINETUNE = "train", "finetune"
_TARGETS = {TRAIN: TrainConfig, FINETUNE: FinetuneConfig}


def config_flag(
    p: argparse.ArgumentParser,
    flag: str,
    key: str,
    help: str | None = None,
    *,
    target: str = TRAIN,
    **kwargs: Any,
) -> None:
    """A flag that sets config ``key``: choices from the key's ``Literal``, booleans as switches;
    the value is checked when the config is built, like a ``key=value`` override."""
    tp = base_type(key_type(key, _TARGETS[target]))
    dest = f"{target}:{key}"
    if tp is bool:
        p.add_argument(flag, dest=dest, action="store_true", default=None, help=help)
    elif kwargs.get("nargs") == "*":
        p.add_argument(flag, dest=dest, metavar=key.rsplit(".", 1)[-1].upper(), help=help, **kwargs)
    else:
        meta = None if choices(tp) else key.rsplit(".", 1)[-1].upper()
        p.add_argument(flag, dest=dest, choices=choices(tp) or None, metavar=meta, help=help, **kwargs)


def flag_values(args: argparse.Namespace, target: str = TRAIN) -> dict[str, Any]:
    """The config keys the command line set for ``target``, as values (YAML-read unless the key is
    a string), ready for validation."""
    out = {}
    for dest, raw in vars(args).items():
        prefix, _, key = dest.partition(":")
        if prefix != target or raw is None:
            continue
        tp = base_type(key_type(key, _TARGETS[target]))
        out[key] = raw if tp is str or choices(tp) or not isinstance(raw, str) else parse_value(raw)
    return out


def overrides_from(args: argparse.Namespace, target: str = TRAIN) -> dict[str, Any]:
    """Flags and ``key=value`` pairs as dotted config overrides (flags win), the data rule applied
    (:func:`reslab.config.data_name`); one budget (epochs or iterations) replaces the recipe's other one."""
    overrides = dict(parse_override(item) for item in getattr(args, "overrides", None) or [])
    overrides.update(flag_values(args, target))
    name = data_name(overrides.get("data.name"), overrides.get("data.dir"))
    if name is not None:
        overrides["data.name"] = name
    return one_budget(overrides)


def add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="any config key, e.g. optim.nesterov=true"
    )


# --- options several commands take ---------------------------------------------------------------


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """``--data`` and ``--data-dir``, bound to the config (training commands)."""
    config_flag(p, "--data", "data.name", "default: folder when --data-dir is given, else the recipe's")
    config_flag(
        p, "--data-dir", "data.dir", "a dataset folder (implies --data folder unless --data says otherwise)"
    )


def add_data_options(p: argparse.ArgumentParser) -> None:
    """``--data`` and ``--data-dir`` for commands that use a trained model (default: its own data)."""
    p.add_argument(
        "--data", choices=choices(key_type("data.name")), help="default: the data it was trained on"
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a dataset folder (implies --data folder unless --data says otherwise)",
    )


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=choices(Precision),
        default="auto",
        help="inference arithmetic (auto: fp32 on CPUs; on CUDA the faster of bf16 and fp16, checked against fp32)",
    )


def add_checkpoints(p: argparse.ArgumentParser, help: str = "one, or several to ensemble") -> None:
    p.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT", help=help)
    add_model_option(p)


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="architecture of bare state dicts (reslab checkpoints name their own)")


# --- output --------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; ``columns`` are (key, header) pairs."""
    cells = [[h for _, h in columns]] + [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing file of another kind at the output path"
    )
