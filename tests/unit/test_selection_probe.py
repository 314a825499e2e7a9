"""The selection probe's rules pick what they say (synthetic candidates, no model)."""

import json
from pathlib import Path

import pytest

from fedmira.simulations.scripts.selection_probe import RULES, _mbr, score


def _row() -> dict:
    return {"report_id": "r1", "reference": "no acute disease", "retrieval": "heart is enlarged",
            "beams": ["no acute disease seen", "pleural effusion"], "beam_lp": [-0.5, -0.1],
            "cases": ["no acute disease", "no acute cardiopulmonary disease", "enlarged heart"],
            "case_lp": [-2.0, -0.3, -1.0]}


def test_mbr_picks_the_consensus_and_the_bonus_can_overrule_it() -> None:
    cands = ["no acute disease", "no acute disease seen", "pleural effusion"]
    assert _mbr(cands, cands, [0.0, 0.0, 0.0], 0.0) in cands[:2]
    assert _mbr(cands, cands, [0.0, 0.0, 10.0], 1.0) == "pleural effusion"


def test_rules_choose_as_named() -> None:
    row = _row()
    assert RULES["beam 1"](row) == "no acute disease seen"
    assert RULES["prior case the adapter finds likeliest"](row) == "no acute cardiopulmonary disease"
    assert RULES["medoid of the prior cases"](row) in row["cases"][:2]


def test_score_prints_every_rule_against_retrieval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(_row()) + "\n")
    score(path)
    out = capsys.readouterr().out
    assert "1 reports; retrieval (TF-IDF, all sites) ROUGE-L 0.0000" in out
    for name in RULES:
        assert name in out
