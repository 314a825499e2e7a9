"""The `fedmira` command: each subcommand end to end on the tiny model and synthetic fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmira.cli import main

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def test_data_check_ok_and_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(ASSETS / "tiny_reports.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "24" in out  # rows in the fixture
    assert main(["data", "check", "/nonexistent/reports.csv"]) == 2


def test_bad_override_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.lr=-3"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err


def test_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "+debug=tiny"]) == 0
    out = capsys.readouterr().out
    assert "model.name_or_path = 'tiny-random'" in out and "strategy.rounds" in out


def test_train_then_generate_then_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "outputs"
    assert main(["train", "+debug=tiny", "train.steps=3", f"run.out_dir={out_dir}"]) == 0
    adapters = list(out_dir.glob("train/synthetic-natural/*/adapter"))
    assert len(adapters) == 1 and (adapters[0] / "adapter_model.safetensors").is_file()
    meta = json.loads((adapters[0] / "fedmira.json").read_text())
    assert meta["steps"] == 3 and meta["val_loss_after"] > 0

    result = tmp_path / "impressions.jsonl"
    assert main(["generate", "--adapter", str(adapters[0]), "--input", str(ASSETS / "tiny_reports.jsonl"),
                 "--output", str(result), "+debug=tiny", "generate.max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert len(rows) == 24 and all({"report_id", "site_id", "impression"} <= set(r) for r in rows)

    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("Heart size normal. No effusion.\n\nLungs clear.\n"))
    capsys.readouterr()
    assert main(["generate", "+debug=tiny", "generate.max_new_tokens=4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(x)["report_id"] for x in lines] == ["stdin-1", "stdin-3"]


def test_generate_rejects_bad_adapter_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--adapter", str(tmp_path), "--input", str(ASSETS / "tiny_reports.jsonl"),
                 "+debug=tiny"])
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_partition_writes_site_folders(tmp_path: Path) -> None:
    out = tmp_path / "splits"
    assert main(["partition", f"out={out}", "+debug=tiny", "partition=quantity",
                 "partition.num_sites=3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len({row["site_id"] for row in manifest["rows"]}) == 3
    assert (out / "sites.png").is_file() and (out / "summary.csv").is_file()
    assert main(["partition", "+debug=tiny"]) == 2  # no output folder: a clear error


def test_evaluate_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    code = main(["evaluate", "--out", str(out), "--limit", "6", "--no-encoder", "+debug=tiny",
                 "generate.max_new_tokens=4"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert "overall" in json.dumps(report) and (out / "report.md").is_file()
    assert len((out / "per_sample.csv").read_text().strip().splitlines()) == 7  # header + 6
