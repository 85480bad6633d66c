"""Params and FLOPs: computed for every model, checked against a golden table and published figures.

Regenerate the golden table after an intended architecture change with
``.venv/bin/python -m tests.test_complexity`` (then review its diff).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab import list_models
from reslab.complexity import model_stats

GOLDEN = Path(__file__).parent / "golden" / "complexity.json"
# (params in millions, GMACs: the multiply-adds torchvision and the paper call FLOPs) as published: torchvision's model docs, and the paper's Table 6.
PUBLISHED = {
    "resnet18": (11.69, 1.81),
    "resnet34": (21.80, 3.66),
    "resnet50": (25.56, 4.09),
    "resnet101": (44.55, 7.80),
    "resnet152": (60.19, 11.51),
}
PAPER_TABLE6 = {
    "resnet20": 0.27,
    "resnet32": 0.46,
    "resnet44": 0.66,
    "resnet56": 0.85,
    "resnet110": 1.7,
    "resnet1202": 19.4,
}


def _golden() -> dict[str, dict]:
    return json.loads(GOLDEN.read_text())


def update_golden_table() -> None:
    """Rewrite the table after a reviewed change: ``.venv/bin/python -m tests.test_complexity``."""
    table = {}
    for name in list_models():
        s = model_stats(name, cache=False)
        table[name] = {"params": s["params"], "gmacs": round(s["gmacs"], 6)}
    GOLDEN.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def test_every_model_has_a_golden_entry() -> None:
    missing = sorted(set(list_models()) - set(_golden()))
    assert not missing, f"no golden entry for {missing}: run python -m tests.test_complexity"


@pytest.mark.parametrize("name", list_models())
def test_golden_table(name: str) -> None:
    """Params and FLOPs counted by running each model (meta device) equal the reviewed table."""
    stats, golden = model_stats(name), _golden()[name]  # (the tests' cache starts empty)
    assert stats["params"] == golden["params"]
    assert round(stats["gmacs"], 6) == golden["gmacs"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_torchvision_published_figures(name: str) -> None:
    params_m, gmacs = PUBLISHED[name]
    stats = model_stats(name)
    assert round(stats["params"] / 1e6, 2) == params_m
    assert round(stats["gmacs"], 2) == gmacs


@pytest.mark.parametrize("name", sorted(PAPER_TABLE6))
def test_paper_table6_params(name: str) -> None:
    expected = PAPER_TABLE6[name]
    digits = 2 if expected < 1 else 1
    assert round(model_stats(name)["params"] / 1e6, digits) == expected


def test_cache_is_keyed_by_spec(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path))
    first = model_stats("resnet20")
    assert (tmp_path / "complexity.json").exists()
    assert model_stats("resnet20") == first


def test_models_doc_matches_the_golden_table() -> None:
    """docs/models.md is generated (`reslab models --markdown`); it must not drift from the models."""
    import re

    doc = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| \d+ \| ([\d.]+)M \| [\d.]+ \|", doc, re.M))
    golden = _golden()
    assert set(rows) == set(list_models()), "regenerate: reslab models --markdown > docs/models.md"
    for name, params in rows.items():
        assert float(params) == round(golden[name]["params"] / 1e6, 2), name


if __name__ == "__main__":
    update_golden_table()
