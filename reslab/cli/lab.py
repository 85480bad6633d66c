"""The residual-learning lab: ``analyze STUDY`` (each study declares its own arguments)."""

from __future__ import annotations

import argparse
from pathlib import Path

from reslab.cli.options import Handler, Parser, command


@command("analyze", "the residual-learning lab: degradation, gradients, responses, landscape, lesion, report")
def _analyze(p: argparse.ArgumentParser) -> Handler:
    from reslab.analysis import STUDIES

    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True, parser_class=Parser)
    for name, module in STUDIES.items():
        sp = studies.add_parser(name, help=module.HELP, description=module.HELP)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(sp)

    def run(args: argparse.Namespace) -> int:
        result = STUDIES[args.study].main(args)
        if "report" in result:
            print(f"report: {result['report']}")
            return 0
        print(Path(result["out"], "summary.md").read_text())
        print(f"study folder: {result['out']}")
        return 0

    return run


@command("reproduce", "train a recipe with several seeds: mean and std of test error and time (records)")
def _reproduce(p: argparse.ArgumentParser) -> Handler:
    from reslab.analysis import reproduce

    reproduce.add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        result = reproduce.main(args)
        print(Path(result["out"], "summary.md").read_text())
        print(f"study folder: {result['out']}")
        return 0

    return run
