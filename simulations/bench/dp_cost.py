"""DP cost: a DP-SGD step (Opacus per-sample gradients, clipping, noise) vs a plain step.

A: ``common.privacy.dp_train_steps`` as a site runs it with ``privacy=dp`` (wrapping the model
in Opacus' ``GradSampleModule`` each call, per-sample losses, per-unit clipping, noise, the
ledger update), with sampling rate 1 so every step sees exactly the same batch as B; once with
``privacy.clipping=flat`` (the default: one buffer) and once with ``opacus`` (Opacus'
per-tensor ``DPOptimizer``).
B: ``common.engine.train_steps``, the non-DP site path, on the same model, examples, batch size,
learning rate and threads.

Each call trains ``steps`` steps from the same adapter; calls rotate A-flat, A-opacus, B (the
order shifting each time) after a warm-up of each, and each ratio is the median of the per-step
time ratios measured in the same rotation::

    python -m fedmira.simulations.bench.dp_cost            # embedded SmolLM2-135M, about a minute
    python -m fedmira.simulations.bench.dp_cost --quick    # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedmira.simulations.bench.common import BenchRow, median_ratio


@dataclass(frozen=True)
class Settings:
    """One benchmark size: config overrides, batch, steps per call, interleaved pairs, label."""

    overrides: tuple[str, ...]
    batch: int
    steps: int
    pairs: int
    label: str


FULL = Settings((), batch=4, steps=2, pairs=3, label="embedded SmolLM2-135M")
QUICK = Settings(("+debug=tiny",), batch=4, steps=3, pairs=3, label="tiny-random")
THREADS = 1  # as in client_overhead: one thread varies least on a shared 2-core machine


def _setup(settings: Settings) -> tuple[Callable[[str], float], Callable[[], float], dict[str, Any]]:
    from fedmira.common.adapters import get_adapter_state, set_adapter_state
    from fedmira.common.compose import compose_config
    from fedmira.common.engine import encode_reports, train_steps
    from fedmira.common.model import apply_lora, load_base_model
    from fedmira.common.privacy import AccountantState, dp_train_steps
    from fedmira.common.synthetic import make_synthetic_corpus

    cfg = compose_config([*settings.overrides, f"train.batch_size={settings.batch}", "train.grad_accum=1"])
    loaded = load_base_model(cfg.model)
    model = apply_lora(loaded.model, cfg.lora, seed=0)
    start = get_adapter_state(model)
    reports = list(make_synthetic_corpus(num_sites=1, num_reports=settings.batch, seed=11))[: settings.batch]
    examples = encode_reports(reports, loaded.tokenizer, cfg.data)
    pad = int(loaded.tokenizer.pad_token_id)

    def dp(clipping: str) -> float:
        set_adapter_state(model, start)
        ledger = AccountantState(units=len(examples), noise_multiplier=1.0, sample_rate=1.0,
                                 planned_steps=settings.steps)
        t = time.perf_counter()
        dp_train_steps(model, examples, list(range(len(examples))), cfg.train, ledger, loaded.device, pad,
                       max_grad_norm=1.0, steps=settings.steps, seed=0, clipping=clipping)
        return (time.perf_counter() - t) / settings.steps

    def plain() -> float:
        set_adapter_state(model, start)
        t = time.perf_counter()
        train_steps(model, examples, cfg.train, loaded.device, pad, steps=settings.steps, seed=0)
        return (time.perf_counter() - t) / settings.steps

    tokens = sum(len(e.input_ids) for e in examples)
    return dp, plain, {"tokens": tokens, "device": str(loaded.device)}


def run(quick: bool) -> list[BenchRow]:
    """Median per-step seconds of DP-SGD (flat, opacus) and plain steps, and median paired ratios."""
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        dp, plain, info = _setup(settings)
        calls: dict[str, Callable[[], float]] = {
            "flat": lambda: dp("flat"), "opacus": lambda: dp("opacus"), "plain": plain}
        for call in calls.values():
            call()  # warm-up: first-call allocations and kernels
        names = list(calls)
        rounds = []
        for i in range(settings.pairs):
            order = names[i % 3:] + names[: i % 3]
            rounds.append({name: calls[name]() for name in order})
    finally:
        torch.set_num_threads(threads)

    def median(name: str) -> float:
        return sorted(r[name] for r in rounds)[len(rounds) // 2]

    note = (f"{settings.label}, batch {settings.batch} ({info['tokens']} tokens), "
            f"{settings.steps} steps per call, {settings.pairs} interleaved rotations, {THREADS} thread, "
            f"{info['device']}; DP: Opacus hooks, sigma 1, C 1")
    return [
        BenchRow("DP-SGD step (flat clipping) / plain step", median("flat"), "s/step",
                 baseline=median("plain"),
                 ratio=median_ratio([(r["flat"], r["plain"]) for r in rounds]),
                 target="<= 1.5", note=note + "; GPU target <= 1.2 (cuda_check.py)"),
        BenchRow("DP-SGD step (Opacus per-tensor clipping) / plain step", median("opacus"), "s/step",
                 baseline=median("plain"), ratio=median_ratio([(r["opacus"], r["plain"]) for r in rounds]),
                 target="<= 1.5", note=note),
        BenchRow("DP-SGD step: flat / Opacus per-tensor clipping", median("flat"), "s/step",
                 baseline=median("opacus"), ratio=median_ratio([(r["flat"], r["opacus"]) for r in rounds]),
                 target="<= 1.0", note=note),
    ]


def main() -> None:
    """Run the benchmark (``--quick``: tiny random model) and print its rows."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    args = parser.parse_args()
    for row in run(args.quick):
        print(f"{row.name}: {row.value:.3f} {row.unit} vs {row.baseline:.3f} -> ratio {row.ratio:.3f} "
              f"(target {row.target}) [{row.note}]")


if __name__ == "__main__":
    main()
