"""Benchmarks' behaviour, never their timings: the communication arithmetic against hand-computed
numbers, ratios and targets, how timings become rows, and the runner's JSON/Markdown output
from fake benchmark modules."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from fedmira.common.config import LoraConfig
from fedmira.common.model import apply_lora, build_tiny_model, build_tiny_tokenizer, count_trainable
from fedmira.simulations.bench import comm
from fedmira.simulations.bench import run as runner
from fedmira.simulations.bench.aggregation import bench_rows
from fedmira.simulations.bench.client_overhead import QUICK, batch_order, rows_from
from fedmira.simulations.bench.common import BenchRow, median_ratio, parse_target
from fedmira.simulations.bench.sim_overhead import marginal_row, round_timings, rows_for


# ----------------------------------------------------------------------------- communication
def test_parameter_counts_match_the_published_model_sizes() -> None:
    # SmolLM2-135M: 49152*576 tied embeddings + 30 blocks of 3,540,096 + final norm 576
    assert comm.SMOLLM2_135M.num_params() == 49152 * 576 + 30 * 3_540_096 + 576 == 134_515_008
    assert comm.LLAMA2_7B.num_params() == 6_738_415_616
    assert comm.MISTRAL_7B.num_params() == 7_241_732_096


def test_lora_parameter_counts_by_hand() -> None:
    # r * (d_in + d_out) per target per block
    assert comm.SMOLLM2_135M.lora_params(8, comm.QV) == 30 * 8 * ((576 + 576) + (576 + 192)) == 460_800
    assert comm.LLAMA2_7B.lora_params(8, comm.QV) == 32 * 8 * 2 * (4096 + 4096) == 4_194_304
    per_block = 16 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert comm.LLAMA2_7B.lora_params(16, comm.ALL_LINEAR) == 32 * per_block == 39_976_960
    assert comm.MISTRAL_7B.lora_params(8, comm.QV) == 32 * 8 * ((4096 + 4096) + (4096 + 1024)) == 3_407_872
    assert comm.SMOLLM2_135M.lora_tensors(comm.QV) == 120
    with pytest.raises(ValueError, match="unknown target"):
        comm.SMOLLM2_135M.lora_params(8, ("qkv",))


def test_shapes_from_a_real_config_count_the_real_model() -> None:
    """The arithmetic agrees with torch on a real (tiny) Llama, base and LoRA parameters."""
    model = build_tiny_model(build_tiny_tokenizer())
    shape = comm.DecoderShape.from_hf_config("tiny", model.config)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())
    lora = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=list(comm.ALL_LINEAR)))
    assert shape.lora_params(4, comm.ALL_LINEAR) == count_trainable(lora)


def test_round_bytes_fp32_down_and_transport_up() -> None:
    assert comm.round_bytes(1000, "float32") == (4000, 4000)
    assert comm.round_bytes(1000, "bfloat16") == (4000, 2000)
    row = comm.comm_row(comm.SMOLLM2_135M, 8, comm.QV, "bfloat16")
    assert row.value == pytest.approx((460_800 * 4 + 460_800 * 2) / 1e6)
    assert row.baseline == pytest.approx(134_515_008 * 4 / 1e6)
    assert row.ratio == pytest.approx(row.value / row.baseline)
    assert row.unit == "MB" and "q,v" in row.name


# ----------------------------------------------------------------------------- rows and ratios
def test_ratio_comes_from_the_baseline_unless_given() -> None:
    assert BenchRow("a", 3.0, "s", baseline=2.0).ratio == 1.5
    assert BenchRow("a", 3.0, "s", baseline=2.0, ratio=1.2).ratio == 1.2
    assert BenchRow("a", 3.0, "s").ratio is None
    zero = BenchRow("a", 3.0, "s", baseline=0.0)
    assert math.isnan(zero.ratio) and zero.to_dict()["ratio"] is None  # JSON has no NaN


def test_targets_are_checked_on_the_ratio() -> None:
    assert BenchRow("a", 0.96, "x", baseline=1.0, target=">= 0.95").met is True
    assert BenchRow("a", 0.90, "x", baseline=1.0, target=">= 0.95").met is False
    assert BenchRow("a", 1.6, "x", baseline=1.0, target="<= 1.5").met is False
    assert BenchRow("a", 1.6, "x", target="<= 1.5").met is None  # no ratio: nothing to check
    assert BenchRow("a", 1.0, "x").met is None
    assert parse_target(" <1e-3") == ("<", 0.001)
    with pytest.raises(ValueError, match="must look like"):
        BenchRow("a", 1.0, "x", target="about 1")


def test_median_ratio_of_interleaved_pairs() -> None:
    assert median_ratio([(1.0, 2.0), (3.0, 3.0), (10.0, 4.0)]) == 1.0
    with pytest.raises(ValueError):
        median_ratio([])


def test_client_overhead_rows_from_timings() -> None:
    m = {"tokens": 1000, "a_s": [2.0, 1.0, 4.0], "b_s": [1.0, 1.0, 2.0], "c_s": [1.0, 0.5, 2.0],
         "cold_s": 9.0, "threads": 1, "batch": 4}
    ratio_row, loop_row, plumbing, cold = rows_from(m, QUICK)
    # tokens/s: A = 500, 1000, 250; B = 1000, 1000, 500; pair ratios 0.5, 1.0, 0.5
    assert ratio_row.value == 500 and ratio_row.baseline == 1000 and ratio_row.ratio == 0.5
    assert ratio_row.met is False and ratio_row.target == ">= 0.95"
    # C = 1000, 2000, 500 tok/s vs B: ratios 1, 2, 1
    assert loop_row.ratio == 1.0 and loop_row.value == 1000 and not loop_row.target
    assert plumbing.value == pytest.approx(1000.0) and plumbing.unit == "ms"  # median of A - C: 1, 0.5, 2 s
    assert cold.value == 9.0 and cold.baseline == 2.0


def test_batch_order_is_the_seeded_sampler() -> None:
    order = batch_order(10, 4, 5, seed=3)
    assert order == batch_order(10, 4, 5, seed=3) and len(order) == 5
    assert all(len(b) == 4 for b in order) and order != batch_order(10, 4, 5, seed=4)


def test_aggregation_rows_against_the_numpy_baseline() -> None:
    rows = bench_rows([
        ("bare numpy weighted mean (baseline)", (10.0, 8.0)),
        ("fedavg: weighted_mean", (20.0, 16.0)),
        ("hetero_svd r=4/8/16->16, global + updates (rank 294)", (200.0, 150.0)),
        ("FedmiraFedAvg.aggregate_train", (40.0, 30.0)),
        ("FedmiraHeteroSVD.aggregate_train", (400.0, 300.0)),
    ], sites=42, repeats=5)
    by_name = {r.name: r for r in rows}
    assert by_name["bare numpy weighted mean (baseline)"].ratio is None
    assert by_name["fedavg: weighted_mean"].ratio == 2.0
    assert by_name["hetero_svd r=4/8/16 (global + updates) / fedavg math"].ratio == 10.0
    assert by_name["FedmiraHeteroSVD / FedmiraFedAvg aggregate_train"].ratio == 10.0


def _fake_run_folder(tmp_path: Path) -> Path:
    state = {"launched_at": 100.0, "rounds_started_at": 112.0, "wall_s": 40.0, "launcher_startup_s": 2.0}
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "sites.json").write_text(json.dumps({"train_sites": ["a", "b"]}))
    lines = []
    for g, wall, train_s, eval_s in ((1, 10.0, 1.0, 2.0), (2, 4.0, 0.5, 0.5), (3, 6.0, 1.0, 1.0)):
        lines.append(json.dumps({
            "round": g, "round_s": wall,
            "train_sites": {"a": {"train-s": train_s}, "b": {"train-s": train_s}},
            "evaluate_sites": {"a": {"eval-s": eval_s}, "b": {"eval-s": eval_s}},
        }))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_simulation_overhead_from_a_run_folder(tmp_path: Path) -> None:
    t = round_timings(_fake_run_folder(tmp_path))
    assert t["startup"] == 12.0 and t["shutdown"] == 40.0 - 12.0 - 20.0
    assert [r["compute"] for r in t["rounds"]] == [6.0, 2.0, 4.0]
    startup, cold, warm, overhead, shutdown = rows_for(t)
    assert startup.value == 12.0 and shutdown.value == 8.0
    assert cold.value == 10.0 and cold.baseline == 6.0
    # medians of 2, 3
    assert warm.value == 5.0 and warm.baseline == 3.0 and warm.ratio == pytest.approx(5 / 3)
    assert overhead.value == 2.0 and "500 ms per site task" in overhead.note  # 2 s over 4 tasks
    assert warm.name.startswith("N=2:")


def test_marginal_overhead_per_site(tmp_path: Path) -> None:
    small = {"rounds": [{"sites": 8, "wall": 9, "compute": 1}, {"sites": 8, "wall": 3.0, "compute": 1.0}]}
    large = {"rounds": [{"sites": 42, "wall": 9, "compute": 1}, {"sites": 42, "wall": 12.0, "compute": 3.5}]}
    row = marginal_row(small, large)
    assert row.value == pytest.approx((8.5 - 2.0) / 34 * 1000) and row.unit == "ms"


# ----------------------------------------------------------------------------- the runner
def _fake_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fake modules under simulations.bench: one returns rows, one raises."""
    good = types.ModuleType("fedmira.simulations.bench.fake_good")
    good.run = lambda quick: [  # type: ignore[attr-defined]
        BenchRow("fast | thing", 2.0, "s", baseline=4.0, target=">= 0.95", note=f"quick={quick}"),
        BenchRow("bytes", 1234.5, "MB"),
    ]
    bad = types.ModuleType("fedmira.simulations.bench.fake_bad")

    def broken(quick: bool) -> list[BenchRow]:
        raise RuntimeError("boom")

    bad.run = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedmira.simulations.bench.fake_good", good)
    monkeypatch.setitem(sys.modules, "fedmira.simulations.bench.fake_bad", bad)
    monkeypatch.setattr(runner, "BENCHMARKS", ("fake_good", "fake_bad"))


def test_runner_writes_json_and_markdown_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_benchmarks(monkeypatch)
    code = runner.main(["--quick", "--out", str(tmp_path)])
    assert code == 1  # a benchmark failed to run
    (json_path,) = tmp_path.glob("bench-*.json")
    doc = json.loads(json_path.read_text())
    assert doc["quick"] is True and doc["machine"]["cpu_count"] and "torch" in doc["machine"]["versions"]
    good = doc["benchmarks"]["fake_good"]
    assert good["error"] == "" and good["rows"][0]["ratio"] == 0.5 and good["rows"][0]["met"] is False
    assert good["rows"][0]["note"] == "quick=True"
    assert "RuntimeError: boom" in doc["benchmarks"]["fake_bad"]["error"]
    md = json_path.with_suffix(".md").read_text()
    assert ("| fake_good   | fast \\| thing | 2       | s      | 4          | 0.5     | >= 0.95 (MISSED) "
            "| quick=True |") in md
    assert "| fake_good   | bytes         | 1,234   | MB     |" in md and "`fake_bad` failed" in md
    out = capsys.readouterr().out
    assert "Targets missed: fake_good: fast | thing" in out and "FAILED to run: fake_bad" in out


def test_runner_only_and_unknown_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_benchmarks(monkeypatch)
    assert runner.main(["--only", "fake_good", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("bench-*.json")
    assert list(json.loads(json_path.read_text())["benchmarks"]) == ["fake_good"]
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope", "--out", str(tmp_path)])


def test_a_module_without_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fedmira.simulations.bench.fake_empty", types.ModuleType("fake_empty"))
    with pytest.raises(ValueError, match="no run"):
        runner.load_benchmark("fake_empty")


def test_registry_names_real_modules_with_run() -> None:
    import importlib.util

    for name in runner.BENCHMARKS:
        assert importlib.util.find_spec(f"fedmira.simulations.bench.{name}") is not None, name


def test_readme_block_is_replaced_and_markers_are_required(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{runner.README_START}\nold table\n{runner.README_END}\nrest\n")
    runner.update_readme(readme, "| new |\n", Path("results/bench-x.md"))
    text = readme.read_text()
    assert "old table" not in text and "| new |" in text and text.startswith("intro\n")
    assert text.endswith(f"{runner.README_END}\nrest\n") and "results/bench-x.md" in text
    (tmp_path / "other.md").write_text("no markers")
    with pytest.raises(ValueError, match="no"):
        runner.update_readme(tmp_path / "other.md", "x", Path("y"))


def test_number_formatting() -> None:
    assert runner.fmt(None) == "" and runner.fmt(float("nan")) == ""
    assert runner.fmt(53907.2) == "53,907" and runner.fmt(42.25) == "42.2"
    assert runner.fmt(0.000622) == "0.000622"
    table = runner.format_table({"b": [BenchRow("x", 1.0, "s", baseline=2.0)]})
    assert table.splitlines()[0].split()[:3] == ["benchmark", "measurement", "value"]
    assert "0.5" in table.splitlines()[2]


def test_secagg_rows_measure_a_real_round_within_its_bound() -> None:
    from fedmira.simulations.bench import secagg

    m = secagg.measure(3, quick=True)  # the tiny model: r=8 q,v on 2 layers, 3,584 values
    assert m["values"] == 3584
    assert 0 < m["error"] <= m["bound"]
    plain, sec = m["none"], m["secaggplus"]
    # protobuf wire bytes: the float32 reply, and the uint32 masked vector plus keys and shares
    assert 3584 * 4 < plain["up"] < sec["up"] < plain["up"] + 4_000
    assert plain["down"] < sec["down"]  # neighbours' public keys and ciphertexts
    assert sec["server_cpu"] > 0 and sec["round_wall"] > 0 and plain["round_wall"] > 0
    rows = secagg.rows_for(3, m)
    assert [r.unit for r in rows] == ["s", "s", "ms", "MB", "MB", "1e-6"]
    assert rows[-1].met is True and rows[3].ratio == pytest.approx(sec["up"] / plain["up"])