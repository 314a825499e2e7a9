"""Client overhead: local training through the ClientApp vs a bare PEFT training loop.

A (the fedmira path): ``client.client_app.train`` called with a real ``Message`` and
``Context``, exactly as Flower calls it at a site: parse the run config, the site's cached
reports and model (``common.site.ModelCache``), load the global adapter, ``local_train``
(``common.engine.train_steps``), encode the reply. Timed around the whole handler call.

B (the baseline): the loop anyone writes with PEFT: the same LoRA model object, the same batches
in the same order (same collate), ``model(..., labels=...).loss``, backward, gradient clipping
at the same norm, ``torch.optim.AdamW`` at the same learning rate, the same torch threads.

C (to locate a gap): ``common.engine.train_steps`` called directly on the same model, examples
and seed, without the handler and ``common.site`` around it. A / C is the plumbing of the
ClientApp path (message, config, caches, adapter in and out); C / B is the training loop itself.

All count the same tokens (attention mask), so tokens/s compare directly. Measurements are
interleaved in rounds A B C, B C A, C A B, ... (each side takes each place in turn) after one
warm-up each, and each ratio is the median over rounds of that round's ratio::

    python -m fedmira.simulations.bench.client_overhead            # embedded SmolLM2-135M, ~2 minutes
    python -m fedmira.simulations.bench.client_overhead --quick    # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedmira.simulations.bench.common import BenchRow, median_ratio


@dataclass(frozen=True)
class Settings:
    """How much to measure: the model, batch shape, steps per call and A/B pairs."""

    overrides: tuple[str, ...]
    steps: int
    pairs: int
    label: str


# The synthetic reports are short (~120 tokens with the site-aware prompt): "short sequences".
# One step per call and more rounds: the median of 5 rounds shrugs off a disturbed one better
# than fewer rounds of longer calls in the same time (a per-call cost, if any, still shows).
FULL = Settings(("train.batch_size=4",), steps=1, pairs=5, label="embedded SmolLM2-135M")
QUICK = Settings(("+debug=tiny", "train.batch_size=4"), steps=3, pairs=3, label="tiny-random")
# One torch thread on both sides: with 2 threads on 2 cores shared with other work, OpenMP's
# barriers stall and the same SmolLM2 step took 2 to 17 s; one thread varies a few percent.
# The overhead being measured (Python around the loop) does not depend on the thread count.
THREADS = 1
SITE_REPORTS = 32
GLOBAL_ROUND = 1


def _site_folder(root: Path) -> Path:
    """Write a hospital folder with synthetic reports (train.jsonl, val.jsonl)."""
    from fedmira.common.reports import write_jsonl
    from fedmira.common.synthetic import make_synthetic_corpus

    reports = make_synthetic_corpus(num_sites=1, num_reports=SITE_REPORTS + 4, seed=11)
    folder = root / "site_bench"
    write_jsonl(reports[:SITE_REPORTS], folder / "train.jsonl")
    write_jsonl(reports[SITE_REPORTS:], folder / "val.jsonl")
    return folder


def _message(state: dict[str, torch.Tensor], lr: float, steps: int) -> Message:
    """Return the server's train instruction: the global adapter and the round's settings."""
    metadata = Metadata(run_id=1, message_id="bench", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=str(GLOBAL_ROUND), created_at=time.time(), ttl=3600.0,
                        message_type=MessageType.TRAIN)
    config = ConfigRecord({"global-round": GLOBAL_ROUND, "lr": lr, "local-steps": steps})
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "config": config}), metadata=metadata)


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Return the example indices of each step, as ``train_steps`` draws them for this seed."""
    import random

    from fedmira.common.engine import _batches  # the exact sampler of the site path: same batches in B

    it = _batches(n, batch_size, random.Random(seed))
    return [next(it) for _ in range(steps)]


def bare_loop(model: Any, examples: list[Any], order: list[list[int]], pad_id: int,
              lr: float, max_grad_norm: float) -> float:
    """Seconds for a plain PEFT training loop over ``order`` (collate included, as a DataLoader would)."""
    from fedmira.common.prompts import collate

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for idx in order:
        batch = collate([examples[i] for i in idx], pad_id)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    return seconds


def measure(settings: Settings) -> dict[str, Any]:
    """Interleaved A/B timings; returns tokens per call and the per-call seconds of each side."""
    import fedmira.client.client_app as client_app
    from fedmira.common.adapters import get_adapter_state, set_adapter_state
    from fedmira.common.compose import compose_config
    from fedmira.common.engine import encode_reports, train_steps
    from fedmira.common.site import load_site

    threads = THREADS
    cfg = compose_config([*settings.overrides, f"train.threads={threads}", f"train.steps={settings.steps}"])
    with tempfile.TemporaryDirectory(prefix="fedmira-bench-") as tmp:
        folder = _site_folder(Path(tmp))
        context = Context(run_id=1, node_id=1,
                          node_config={"data-path": str(folder), "site-id": "site_bench"},
                          state=RecordDict(), run_config=cfg.to_run_config())
        lr = cfg.train.lr

        def call_a() -> float:
            msg = _message(initial, lr, settings.steps)
            start = time.perf_counter()
            client_app.train(msg, context)
            return time.perf_counter() - start

        cold_start = time.perf_counter()
        worker, _ = client_app._MODELS.get(cfg.model, cfg.lora, seed=cfg.train.seed)  # the handler's cache
        initial = {k: v.clone() for k, v in get_adapter_state(worker.model).items()}
        call_a()  # the first call: base model load + LoRA wrap + tokenizing the site, then training
        cold_s = time.perf_counter() - cold_start
        tok = worker.loaded.tokenizer
        examples = encode_reports(load_site(folder).train, tok, cfg.data)
        seed = cfg.train.seed * 1000003 + GLOBAL_ROUND * 1009 + 0  # the handler's seed for site index 0
        order = batch_order(len(examples), cfg.train.batch_size, settings.steps, seed)
        tokens = sum(sum(len(examples[i].input_ids) for i in idx) for idx in order)

        def call_b() -> float:
            set_adapter_state(worker.model, initial)
            torch.set_num_threads(threads)
            return bare_loop(worker.model, examples, order, int(tok.pad_token_id), lr,
                             cfg.train.max_grad_norm)

        def call_c() -> float:
            set_adapter_state(worker.model, initial)
            torch.set_num_threads(threads)
            start = time.perf_counter()
            train_steps(worker.model, examples, cfg.train, worker.loaded.device, int(tok.pad_token_id),
                        seed=seed, lr=lr, steps=settings.steps)
            return time.perf_counter() - start

        call_b(), call_c()  # warm-ups (the handler's warm-up was its cold call)
        sides = {"a_s": call_a, "b_s": call_b, "c_s": call_c}
        times: dict[str, list[float]] = {k: [] for k in sides}
        names = list(sides)
        for i in range(settings.pairs):  # A B C, B C A, C A B, ...: each side takes each place in turn
            for key in names[i % 3:] + names[: i % 3]:
                times[key].append(sides[key]())
    return {"tokens": tokens, **times, "cold_s": cold_s, "threads": threads,
            "batch": cfg.train.batch_size, "rows": len(examples)}


def rows_from(m: dict[str, Any], settings: Settings) -> list[BenchRow]:
    """ClientApp / bare loop (the target), train_steps / bare loop, plumbing per call, cold start."""
    tokens = m["tokens"]
    a_tps, b_tps, c_tps = ([tokens / s for s in m[k]] for k in ("a_s", "b_s", "c_s"))
    per_token = tokens / (settings.steps * m["batch"])
    setting = (f"{settings.label}, LoRA r=8 q,v, batch {m['batch']}, ~{per_token:.0f} tokens/row, "
               f"{settings.steps} steps per call, {m['threads']} thread(s), "
               f"{settings.pairs} interleaved rounds")

    def listed(xs: list[float], ys: list[float]) -> str:
        best = max(xs) / max(ys)  # the fastest runs are the least disturbed by other work
        ratios = ", ".join(f"{x / y:.3f}" for x, y in zip(xs, ys))
        return f"per-round ratios {ratios}; best vs best {best:.3f}"

    plumbing = statistics.median(a - c for a, c in zip(m["a_s"], m["c_s"]))
    return [
        BenchRow(name="ClientApp train handler / bare PEFT loop (tokens/s)",
                 value=statistics.median(a_tps), unit="tok/s", baseline=statistics.median(b_tps),
                 ratio=median_ratio(list(zip(a_tps, b_tps))), target=">= 0.95",
                 note=f"{setting}; {listed(a_tps, b_tps)}"),
        BenchRow(name="engine.train_steps alone / bare PEFT loop (tokens/s)",
                 value=statistics.median(c_tps), unit="tok/s", baseline=statistics.median(b_tps),
                 ratio=median_ratio(list(zip(c_tps, b_tps))),
                 note=f"the training loop without the handler and common.site; {listed(c_tps, b_tps)}"),
        BenchRow(name="ClientApp plumbing per train call (handler - train_steps)", value=plumbing * 1000,
                 unit="ms", note=f"median per round; a call of {settings.steps} step(s) takes "
                                 f"{statistics.median(m['a_s']):.2f} s"),
        BenchRow(name="ClientApp first call (cold) vs a warm call", value=m["cold_s"], unit="s",
                 baseline=statistics.median(m["a_s"]),
                 note="cold: base model load + LoRA wrap + tokenizing the site + the same training; "
                      "a simulated or deployed site pays it once per process (ModelCache)"),
    ]


def run(quick: bool) -> list[BenchRow]:
    """``quick``: the tiny random model instead of SmolLM2 (same code path, seconds)."""
    settings = QUICK if quick else FULL
    return rows_from(measure(settings), settings)


def main(argv: list[str] | None = None) -> None:
    """Print the rows (the runner, ``python -m fedmira.simulations.bench.run``, also writes them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2")
    args = parser.parse_args(argv)
    from fedmira.simulations.bench.run import format_table

    print(format_table({"client_overhead": run(args.quick)}, notes=True))


if __name__ == "__main__":
    main()
