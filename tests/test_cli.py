"""The CLI: output contracts and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from reslab.cli import main


def test_models_json(capsys) -> None:
    assert main(["models", "--json", "resnet[25]0"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"resnet20", "resnet50"}
    assert all({"name", "params", "gmacs", "input_size"} <= set(r) for r in rows)
    assert by_name["resnet50"]["params"] == 25557032
    assert by_name["resnet50"]["input_size"] == [224, 224]
    assert by_name["resnet20"]["input_size"] == [32, 32]


def test_models_table(capsys) -> None:
    assert main(["models", "plain5*"]) == 0
    out = capsys.readouterr().out
    assert "plain56" in out and "0.85M" in out and "GMACs" in out


def test_info(capsys) -> None:
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "2048x7x7" in out and "25.56M" in out


def test_errors_are_one_line_without_traceback() -> None:
    for args, needle in ((["info", "resnet5"], "did you mean"), (["models", "zzz*"], "no model matches")):
        proc = subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True)
        assert proc.returncode != 0
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "reslab", "info", "resnet5", "--debug"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
