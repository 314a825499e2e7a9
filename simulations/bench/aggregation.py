"""How long does the server take to aggregate one round? FedAvg vs the exact hetero method.

Builds random LoRA adapters with the shapes of the embedded model (SmolLM2-135M, r=8 on q_proj
and v_proj: 30 layers, q_proj 576x576, v_proj 576->192 (3 KV heads x 64), 120 tensors, 460,800
parameters) for K sites, and times each aggregation rule (median of several repeats) next to a
bare NumPy weighted mean, which is what Flower's own FedAvg does (``run`` gives the same numbers
to ``python -m fedmira.simulations.bench.run`` as rows)::

    python -m fedmira.simulations.bench.aggregation                  # 42 sites, 5 repeats
    python -m fedmira.simulations.bench.aggregation --sites 4        # the default 10% sample of 42
    python -m fedmira.simulations.bench.aggregation --linalg-threads 2

Two groups of rows: the pure math of ``common.aggregation`` on NumPy arrays, and the Flower
strategies' ``aggregate_train`` on real reply Messages (which adds deserialising every tensor,
the NaN/shape checks and the update-norm check). The means do not depend on the values; the
hetero SVD does: independent random factors are its worst case, while real replies (every
site starts from the same global adapter and moves a little) leave most of the core's
eigenvalues near zero, which LAPACK's divide and conquer deflates cheaply. Both are timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import fedmira.common.aggregation as agg
from fedmira.simulations.bench.common import BenchRow

LAYERS, HIDDEN, KV_DIM = 30, 576, 192


def adapter(rank: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One site's random LoRA state with SmolLM2-135M's q_proj/v_proj shapes at ``rank``."""
    state: dict[str, np.ndarray] = {}
    for layer in range(LAYERS):
        prefix = f"base_model.model.model.layers.{layer}.self_attn."
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV_DIM)):
            bound = 1 / np.sqrt(HIDDEN)
            a = rng.uniform(-bound, bound, (rank, HIDDEN))
            b = rng.standard_normal((out, rank)) * 1e-2
            state[f"{prefix}{proj}.lora_A.weight"] = a.astype(np.float32)
            state[f"{prefix}{proj}.lora_B.weight"] = b.astype(np.float32)
    return state


def near(
    glob: dict[str, np.ndarray], rank: int, rng: np.random.Generator, scale: float = 0.05,
) -> dict[str, np.ndarray]:
    """Return a site's reply in a real round: the global adapter cut to ``rank`` plus a small update."""
    out = {}
    for k, v in agg.truncate_adapter(glob, rank).items():
        out[k] = v + (rng.standard_normal(v.shape) * scale * v.std()).astype(np.float32)
    return out


def bare_numpy_mean(states: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Return the baseline: Flower's FedAvg arithmetic, a weighted sum tensor by tensor."""
    w = weights / weights.sum()
    out = {k: v * w[0] for k, v in states[0].items()}
    for wk, state in zip(w[1:], states[1:]):
        for k, v in state.items():
            out[k] += v * wk
    return out


def timed_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median, best) wall time in ms of ``repeats`` calls, after one warm-up call.

    The best run is the closest to an idle machine when other jobs share the cores.
    """
    fn()
    times = timeit.repeat(fn, number=1, repeat=max(1, repeats))
    return statistics.median(times) * 1000, min(times) * 1000


def math_rows(sites: int, repeats: int, rng: np.random.Generator) -> list[tuple[str, tuple[float, float]]]:
    """Time the pure aggregation functions on NumPy arrays."""
    uniform = [adapter(8, rng) for _ in range(sites)]
    mixed = [adapter((4, 8, 16)[k % 3], rng) for k in range(sites)]
    glob = agg.hetero_aggregate([adapter(16, rng)], [1.0], alpha=32, rank=16)  # SVD form
    typical = [near(glob, (4, 8, 16)[k % 3], rng) for k in range(sites)]
    typical8 = [near(agg.truncate_adapter(glob, 8), 8, rng) for _ in range(sites)]
    weights = rng.integers(20, 200, sites).astype(np.float64)
    w = list(weights)
    r_mixed = sum((4, 8, 16)[k % 3] for k in range(sites))
    return [
        ("bare numpy weighted mean (baseline)",
         timed_ms(lambda: bare_numpy_mean(uniform, weights), repeats)),
        ("fedavg: weighted_mean", timed_ms(lambda: agg.weighted_mean(uniform, w), repeats)),
        ("median: coordinate_median", timed_ms(lambda: agg.coordinate_median(uniform), repeats)),
        ("trimmed_mean (0.1)", timed_ms(lambda: agg.trimmed_mean(uniform, 0.1), repeats)),
        (f"hetero_svd r=8, random factors (stacked rank {8 * sites})",
         timed_ms(lambda: agg.hetero_aggregate(uniform, w, alpha=16, rank=8), repeats)),
        (f"hetero_svd r=8, global + updates (stacked rank {8 * sites})",
         timed_ms(lambda: agg.hetero_aggregate(typical8, w, alpha=16, rank=8), repeats)),
        (f"hetero_svd r=4/8/16->16, random (stacked rank {r_mixed})",
         timed_ms(lambda: agg.hetero_aggregate(mixed, w, alpha=32, rank=16), repeats)),
        (f"hetero_svd r=4/8/16->16, global + updates (rank {r_mixed})",
         timed_ms(lambda: agg.hetero_aggregate(typical, w, alpha=32, rank=16), repeats)),
    ]


def strategy_rows(
    sites: int, repeats: int, rng: np.random.Generator,
) -> list[tuple[str, tuple[float, float]]]:
    """Time the Flower strategies' aggregate_train on reply Messages (checks included)."""
    from fedmira.server.fedadam import FedmiraFedAdam
    from fedmira.server.fedavg import FedmiraFedAvg
    from fedmira.server.hetero_svd import FedmiraHeteroSVD

    glob = agg.hetero_aggregate([adapter(8, rng)], [1.0], alpha=16, rank=8)
    states = [near(glob, 8, rng) for _ in range(sites)]
    replies = [_reply(k + 1, s, int(rng.integers(20, 200))) for k, s in enumerate(states)]
    rows = []
    for label, strategy in (
        ("FedmiraFedAvg.aggregate_train", FedmiraFedAvg(round_config_fn=dict)),
        ("FedmiraFedAdam.aggregate_train", FedmiraFedAdam(round_config_fn=dict)),
        ("FedmiraHeteroSVD.aggregate_train", FedmiraHeteroSVD(round_config_fn=dict, alpha=16, max_rank=8)),
    ):
        strategy.expected = {k: v.shape for k, v in glob.items()}
        strategy.global_arrays = glob
        if isinstance(strategy, FedmiraFedAdam):
            strategy.algorithm.current_arrays = glob
        rows.append((label, timed_ms(lambda s=strategy: s.aggregate_train(1, replies), repeats)))
    return rows


def _reply(node: int, state: dict[str, np.ndarray], n: int) -> Any:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        Metadata,
        MetricRecord,
        RecordDict,
    )

    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type=MessageType.TRAIN)
    instruction = Message(content=RecordDict(), metadata=metadata)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0}),
        "site": ConfigRecord({"site-id": f"site_{node:02d}"}),
    })
    return Message(content, reply_to=instruction)


def bench_rows(rows: list[tuple[str, tuple[float, float]]], sites: int, repeats: int) -> list[BenchRow]:
    """Return the timings as the runner's rows: each rule vs the bare NumPy mean, hetero vs FedAvg."""
    timings = dict(rows)
    base, base_best = rows[0][1]
    setting = f"{sites} adapters, 120 tensors / 460,800 params each, median of {repeats}"
    out = [BenchRow(name=rows[0][0], value=base, unit="ms", note=f"{setting}; best {base_best:.1f} ms")]
    for name, (ms, best) in rows[1:]:
        out.append(BenchRow(name=name, value=ms, unit="ms", baseline=base,
                            note=f"vs the bare NumPy mean; best {best:.1f} ms (x{best / base_best:.1f})"))
    pairs = [
        ("hetero_svd r=4/8/16 (global + updates) / fedavg math",
         next(k for k in timings if k.startswith("hetero_svd r=4/8/16->16, global")),
         "fedavg: weighted_mean"),
        ("FedmiraHeteroSVD / FedmiraFedAvg aggregate_train",
         "FedmiraHeteroSVD.aggregate_train", "FedmiraFedAvg.aggregate_train"),
    ]
    for name, exact, fedavg in pairs:
        if exact in timings and fedavg in timings:
            out.append(BenchRow(name=name, value=timings[exact][0], unit="ms", baseline=timings[fedavg][0],
                                note="the exact heterogeneous-rank aggregate vs FedAvg's mean of the "
                                     "factors"))
    return out


def run(quick: bool) -> list[BenchRow]:
    """42 sites, 5 repeats (``quick``: 2 repeats); the math and the Flower strategies."""
    repeats, sites = (2 if quick else 5), 42
    rng = np.random.default_rng(0)
    return bench_rows(math_rows(sites, repeats, rng) + strategy_rows(sites, repeats, rng), sites, repeats)


def main(argv: list[str] | None = None) -> None:
    """Print the timing table: median and best ms, each also as a multiple of the NumPy mean's."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--linalg-threads", type=int, default=agg.LINALG_THREADS,
                        help="torch threads for the hetero SVD path (default: common.aggregation's)")
    parser.add_argument("--no-strategies", action="store_true", help="time the pure math only")
    args = parser.parse_args(argv)
    agg.LINALG_THREADS = args.linalg_threads
    rng = np.random.default_rng(0)
    print(f"{args.sites} adapters of 120 tensors / 460,800 params (SmolLM2-135M, r=8 q_proj+v_proj); "
          f"median of {args.repeats}; {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, linalg threads {args.linalg_threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = math_rows(args.sites, args.repeats, rng)
    if not args.no_strategies:
        rows += strategy_rows(args.sites, args.repeats, rng)
    base, base_best = rows[0][1]
    width = max(len(name) for name, _ in rows)
    print(f"{'aggregation':<{width}}  {'median ms':>9}  {'x numpy':>7}  {'best ms':>8}  {'x numpy':>7}")
    for name, (ms, best) in rows:
        print(f"{name:<{width}}  {ms:9.1f}  {ms / base:7.1f}  {best:8.1f}  {best / base_best:7.1f}")


if __name__ == "__main__":
    main()
