"""The memorization audit: canaries, candidates, exposure math, extraction, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedmira.common.audit import candidates, exposure, extracted, impression_for, make_canaries, plant
from fedmira.common.reports import Report


def test_exposure_is_log2_candidates_minus_log2_rank() -> None:
    assert exposure(1.0, [2.0, 3.0, 4.0]) == (1, pytest.approx(2.0))  # best of 4: log2(4) - 0
    assert exposure(5.0, [2.0, 3.0, 4.0]) == (4, pytest.approx(0.0))  # worst: no preference at all
    rank, bits = exposure(3.0, [2.0, 3.0, 4.0, 9.0, 9.0, 9.0, 9.0])  # a tie counts against the secret
    assert rank == 3 and bits == pytest.approx(3 - math.log2(3))


def test_candidates_are_distinct_and_exclude_the_secret() -> None:
    got = candidates("123456", 200, seed=1)
    assert len(got) == len(set(got)) == 200
    assert "123456" not in got and all(len(c) == 6 and c.isdigit() for c in got)
    assert got == candidates("123456", 200, seed=1)


def test_canaries_are_unique_synthetic_and_planted_as_one_patient(reports: list[Report]) -> None:
    canaries = make_canaries(reports[0], 3, seed=5)
    assert len({c.secret for c in canaries}) == 3 and len({c.report.findings for c in canaries}) == 3
    for c in canaries:
        assert c.report.impression == impression_for(c.secret) and c.report.site_id == reports[0].site_id
    planted = plant(reports[:10], canaries, repeats=4, seed=0)
    assert len(planted) == 10 + 12
    for c in canaries:
        copies = [r for r in planted if r.patient_id == c.report.patient_id]
        assert len(copies) == 4 and len({r.report_id for r in copies}) == 4
    assert [r for r in planted if not r.report_id.startswith("canary")] == reports[:10]  # order kept


def test_extraction_ignores_spacing_but_needs_every_digit() -> None:
    assert extracted("Follow-up code 48 29 17.", "482917")
    assert not extracted("Follow-up code 4829.", "482917")


def test_tiny_audit_end_to_end(tmp_path: Path) -> None:
    from fedmira.common.compose import compose_config
    from fedmira.simulations.audit_cli import AuditPlan, run_audit

    cfg = compose_config(["+debug=tiny", "strategy.rounds=1", "train.steps=2"])
    result = run_audit(cfg, AuditPlan(canaries=2, repeats=3, candidates=15, sites=2), tmp_path,
                       out=open("/dev/null", "w"))
    assert set(result["arms"]) == {"base", "no_dp", "dp"}
    for arm in result["arms"].values():
        assert len(arm["canaries"]) == 2
        for row in arm["canaries"]:
            assert 1 <= row["rank"] <= 16
            assert 0 <= row["exposure_bits"] <= row["max_bits"] == pytest.approx(4.0)
    eps = result["arms"]["dp"]["info"]["epsilon"]
    assert set(eps) == {"site_01", "site_02"} and all(0 < e <= 8.0 for e in eps.values())
    assert "epsilon" not in result["arms"]["no_dp"]["info"]
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["plan"]["repeats"] == 3
    text = (tmp_path / "audit.md").read_text()
    assert "federated, DP-SGD" in text and "exposure" in text
    for arm in result["arms"].values():  # secrets never reach the report
        for c in arm["canaries"]:
            assert "secret" not in c
    assert (tmp_path / "exposure.png").stat().st_size > 1000
    assert (tmp_path / "dp" / "adapter" / "adapter_model.safetensors").is_file()


def test_sequence_nll_equals_the_summed_token_loss(tiny, reports: list[Report], data_cfg) -> None:  # type: ignore[no-untyped-def]
    """Left padding + logits for the targets only gives each row's full-forward summed loss."""
    import torch

    from fedmira.common.audit import sequence_nll
    from fedmira.common.engine import encode_reports, token_loss
    from fedmira.common.prompts import collate

    rows = reports[:5]  # different lengths, so padding is exercised
    got = sequence_nll(tiny.model, tiny.tokenizer, rows, data_cfg, tiny.device, batch_size=3)
    pad = int(tiny.tokenizer.pad_token_id)
    for report, value in zip(rows, got):
        ex = encode_reports([report], tiny.tokenizer, data_cfg)
        with torch.no_grad():
            expected, _ = token_loss(tiny.model, {k: v.to(tiny.device) for k, v in collate(ex, pad).items()})
        assert value == pytest.approx(float(expected), rel=1e-4)


def test_prefix_cached_candidates_equal_the_full_forward(tiny, reports: list[Report], data_cfg) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from fedmira.common.audit import candidate_nll, sequence_nll

    texts = [impression_for(s) for s in ("123456", "654321", "000000")] + ["No acute findings at all today."]
    cached = candidate_nll(tiny.model, tiny.tokenizer, reports[0], texts, data_cfg, tiny.device, batch_size=3)
    variants = [dataclasses.replace(reports[0], impression=t) for t in texts]
    full = sequence_nll(tiny.model, tiny.tokenizer, variants, data_cfg, tiny.device)
    assert cached == pytest.approx(full, rel=1e-4)


def test_matched_digits_counts_positions_right() -> None:
    from fedmira.common.audit import matched_digits

    assert matched_digits("Follow-up code 489221.", "489241") == 5
    assert matched_digits("Follow-up code 489241.", "489241") == 6
    assert matched_digits("No acute findings.", "489241") == 0
    assert matched_digits("code 12 489241 x", "489241") == 6  # found after other digits
