"""One self-contained HTML page from study (or training run) folders: plots embedded, tables kept."""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError

HELP = "gather study and run folders into one self-contained HTML page"


def _markdown_to_html(text: str, folder: Path) -> str:
    """The small Markdown subset the studies write: headings, paragraphs, bullets, tables, images."""
    out, table = [], []

    def flush_table() -> None:
        if table:
            rows = [
                [c.strip() for c in r.strip("|").split("|")]
                for r in table
                if not re.fullmatch(r"\|[-|\s]+\|", r)
            ]
            head, *body = rows
            out.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if image := re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip()):
            out.append(_img(folder / image.group(2), image.group(1)))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{html.escape(line.lstrip('# '))}</h{level + 1}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    return "\n".join(out)


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f"<p><em>missing image {html.escape(path.name)}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def build_report(folders: list[str], out: str | Path | None = None) -> Path:
    """An HTML page gathering each folder's summary.md (studies) or summary.json + plots (runs)."""
    sections = []
    for f in map(Path, folders):
        if not f.is_dir():
            raise ReslabError(f"{f}: no such folder")
        if (f / "summary.md").exists():
            body = _markdown_to_html((f / "summary.md").read_text(), f)
        elif (f / "summary.json").exists():  # a training run
            summary = json.loads((f / "summary.json").read_text())
            keys = ("model", "data", "eval_split", "iterations", "eval_err", "eval_top5_err", "train_seconds")
            rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(summary.get(k)))}</td></tr>" for k in keys)
            body = f"<h2>run {html.escape(f.name)}</h2><table>{rows}</table>"
            body += "".join(_img(p, p.stem) for p in sorted(f.glob("*.png")))
        else:
            raise ReslabError(f"{f}: neither a study folder (summary.md) nor a run folder (summary.json)")
        sections.append(f"<section><p class=src>{html.escape(str(f))}</p>{body}</section>")
    page = (
        "<!doctype html><html><head><meta charset=utf-8><title>reslab report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;margin:.5em 0}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}section{margin-bottom:3em}"
        ".src{color:#888;font-size:.9em}</style></head><body><h1>reslab report</h1>"
        + "\n".join(sections)
        + "</body></html>"
    )
    path = Path(out) if out else Path(folders[0]) / "report.html"
    path.write_text(page)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folders", nargs="+", metavar="RUN_OR_STUDY_DIR")
    p.add_argument("--out", metavar="FILE.html", help="default: report.html in the first folder")


def main(args: argparse.Namespace) -> dict[str, Any]:
    return {"report": str(build_report(args.folders, args.out))}
