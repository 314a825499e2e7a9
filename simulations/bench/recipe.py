"""Training recipe: what each speed-up of a local step buys, measured side by side.

Each row trains the same LoRA adapter from the same start on the same batch, the two sides
interleaved (A B, B A, ...) after a warm-up of each, and reports the median paired ratio:

* **bf16 autocast / fp32** (``model.autocast``): seconds per step; and the held-out loss after
  the same few steps both ways (bf16 is kept only where it does not hurt the loss).
* **target-only logits / full logits**: ``common.engine.token_loss`` projects onto the
  vocabulary only at impression positions; the baseline is the previous full-vocabulary path.
* **short / full preamble** (``data.preamble``): prompt tokens per example.

::

    python -m fedmira.simulations.bench.recipe            # embedded SmolLM2-135M, a few minutes
    python -m fedmira.simulations.bench.recipe --quick    # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from fedmira.simulations.bench.common import BenchRow, interleaved_pairs, median_ratio


@dataclass(frozen=True)
class Settings:
    """One benchmark size: config overrides, batch, steps per call, interleaved pairs, label."""

    overrides: tuple[str, ...]
    batch: int
    steps: int
    pairs: int
    label: str


FULL = Settings((), batch=8, steps=2, pairs=3, label="embedded SmolLM2-135M")
QUICK = Settings(("+debug=tiny",), batch=4, steps=2, pairs=2, label="tiny-random")
THREADS = 2


@contextlib.contextmanager
def full_logits() -> Iterator[None]:
    """Use the previous loss path inside the block: logits over the whole vocabulary at every position."""
    import fedmira.common.engine as engine

    saved = engine.decoder_and_head
    engine.decoder_and_head = lambda model: None  # token_loss falls back to model(...).logits
    try:
        yield
    finally:
        engine.decoder_and_head = saved


def _setup(settings: Settings) -> dict[str, Any]:
    from fedmira.common.adapters import get_adapter_state
    from fedmira.common.compose import compose_config
    from fedmira.common.engine import encode_reports
    from fedmira.common.model import apply_lora, load_base_model
    from fedmira.common.synthetic import make_synthetic_corpus

    cfg = compose_config([*settings.overrides, f"train.batch_size={settings.batch}", "train.grad_accum=1",
                          "train.lr=1e-3", "data.max_length=320"])
    loaded = load_base_model(cfg.model)
    model = apply_lora(loaded.model, cfg.lora, seed=0)
    reports = list(make_synthetic_corpus(num_sites=2, num_reports=4 * settings.batch, seed=5))
    train, held = reports[: settings.batch], reports[settings.batch : 3 * settings.batch]
    return {"cfg": cfg, "loaded": loaded, "model": model, "start": get_adapter_state(model),
            "train": encode_reports(train, loaded.tokenizer, cfg.data),
            "held": encode_reports(held, loaded.tokenizer, cfg.data), "reports": train}


def _timer(env: dict[str, Any], autocast: torch.dtype | None, full: bool, steps: int) -> Callable[[], float]:
    from fedmira.common.adapters import set_adapter_state
    from fedmira.common.engine import train_steps

    cfg, loaded = env["cfg"], env["loaded"]

    def one() -> float:
        set_adapter_state(env["model"], env["start"])
        ctx = full_logits() if full else contextlib.nullcontext()
        with ctx:
            t = time.perf_counter()
            train_steps(env["model"], env["train"], cfg.train, loaded.device,
                        int(loaded.tokenizer.pad_token_id), steps=steps, seed=0, autocast=autocast)
        return (time.perf_counter() - t) / steps

    return one


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _heldout_after(env: dict[str, Any], autocast: torch.dtype | None, steps: int) -> float:
    """Held-out loss (fp32) after ``steps`` steps trained with ``autocast``."""
    from fedmira.common.adapters import set_adapter_state
    from fedmira.common.engine import evaluate_loss, train_steps

    loaded = env["loaded"]
    pad = int(loaded.tokenizer.pad_token_id)
    set_adapter_state(env["model"], env["start"])
    train_steps(env["model"], env["train"], env["cfg"].train, loaded.device, pad, steps=steps, seed=0,
                autocast=autocast)
    return evaluate_loss(env["model"], env["held"], loaded.device, pad, 8)[0]


def _preamble_row(env: dict[str, Any]) -> BenchRow:
    from fedmira.common.prompts import prompt_ids

    tok, cfg = env["loaded"].tokenizer, env["cfg"]
    full = [len(prompt_ids(r, tok, cfg.data.template, 4096)) for r in env["reports"]]
    short = [len(prompt_ids(r, tok, cfg.data.template, 4096, preamble="short")) for r in env["reports"]]
    mean_full, mean_short = sum(full) / len(full), sum(short) / len(short)
    return BenchRow("short / full preamble, prompt tokens", mean_short, "tokens", baseline=mean_full,
                    note=f"{cfg.data.template} prompts of {len(full)} synthetic reports")


def run(quick: bool) -> list[BenchRow]:
    """bf16 vs fp32 and target-only vs full logits (s/step, paired), preamble tokens, bf16 loss."""
    settings = QUICK if quick else FULL
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        env = _setup(settings)
        bf16 = torch.bfloat16
        n = settings.steps
        amp = interleaved_pairs(_timer(env, bf16, False, n), _timer(env, None, False, n), settings.pairs)
        head = interleaved_pairs(_timer(env, None, False, n), _timer(env, None, True, n), settings.pairs)
        loss_steps = 4 if quick else 8
        loss_fp32, loss_bf16 = _heldout_after(env, None, loss_steps), _heldout_after(env, bf16, loss_steps)
    finally:
        torch.set_num_threads(threads)
    note = (f"{settings.label}, batch {settings.batch}, {settings.steps} steps per call, {settings.pairs} "
            f"interleaved pairs, {THREADS} threads")
    from fedmira.common.model import cpu_has_fast_bf16

    return [
        BenchRow("bf16 autocast / fp32 step", _median([p[0] for p in amp]), "s/step",
                 baseline=_median([p[1] for p in amp]), ratio=median_ratio(amp), target="<= 1.0",
                 note=f"{note}; CPU bf16 fast path (AVX512-BF16/AMX): {cpu_has_fast_bf16()}"),
        BenchRow("held-out loss after bf16 / fp32 training", loss_bf16, "nats", baseline=loss_fp32,
                 target="<= 1.02", note=f"{loss_steps} steps each from the same start, scored in fp32"),
        BenchRow("target-only logits / full logits step", _median([p[0] for p in head]), "s/step",
                 baseline=_median([p[1] for p in head]), ratio=median_ratio(head), target="<= 1.0",
                 note=note),
        _preamble_row(env),
    ]


def main() -> None:
    """Run the benchmark (``--quick``: tiny random model) and print its rows."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    args = parser.parse_args()
    for row in run(args.quick):
        print(f"{row.name}: {row.value:.3f} {row.unit} vs {row.baseline:.3f} -> ratio {row.ratio:.3f} "
              f"(target {row.target or '-'}) [{row.note}]")


if __name__ == "__main__":
    main()
