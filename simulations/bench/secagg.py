"""What does a SecAgg+ round cost over a plain one? Protocol compute, bytes and quantization error.

Runs the whole protocol of ``common.secagg`` in one process for K sites with SmolLM2-135M's LoRA
shapes (r=8 on q_proj and v_proj, 460,800 values; real-round replies: one global adapter plus a
small update per site), with every stage's content passed as the coordinator would route it, and
measures side by side with a plain round's counterparts:

- a site's protocol compute (keys, shares, quantize and mask) against serialising its plain
  float32 reply;
- the coordinator's unmask (sum, seed and mask reconstruction, dequantize) against a bare NumPy
  weighted mean;
- bytes a site sends (public keys, ciphertexts, masked int64 vector, stage-3 shares) against its
  plain float32 reply;
- the largest difference from the plain weighted mean against the stated bound
  (``secagg.error_bound``).

This is the protocol only: the wall time of a Flower round with SecAgg+ is measured once the
stages are wired into ``simulate`` (issue 16)::

    python -m fedmira.simulations.bench.secagg            # 8 and 42 sites
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from fedmira.common.secagg import STAGES, CoordinatorRound, SecAggParams, error_bound, site_stage
from fedmira.simulations.bench.aggregation import adapter, near
from fedmira.simulations.bench.common import BenchRow


def _nbytes(obj: object) -> int:
    if isinstance(obj, (bytes, np.ndarray)):
        return len(obj) if isinstance(obj, bytes) else obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 8


def measure(sites: int, seed: int = 0) -> dict[str, float]:
    """One SecAgg+ round over ``sites`` SmolLM2-shaped adapters: seconds, bytes and error."""
    rng = np.random.default_rng(seed)
    glob = adapter(8, rng)
    keys = sorted(glob)
    arrays = {}
    for nid in range(1, sites + 1):
        reply = near(glob, 8, rng)  # one site's reply: the global adapter plus its own update
        arrays[nid] = [reply[k].astype(np.float64) for k in keys]
    counts = {nid: int(c) for nid, c in zip(arrays, rng.integers(50, 1300, sites))}
    shares = min(5, sites if sites % 2 else sites - 1)
    params = SecAggParams(num_shares=shares, reconstruction_threshold=min(3, shares - 1), max_weight=2000)
    coord = CoordinatorRound(list(arrays), params, seed=seed)
    site_s = {nid: 0.0 for nid in arrays}
    sent = {nid: 0 for nid in arrays}
    kept: dict[int, dict[str, object]] = {}

    def at_sites(stage: int, contents: dict[int, dict[str, object]]) -> dict[int, Any]:
        """Answer one stage at every site through ``site_stage``, as the ClientApp will."""
        replies = {}
        for nid, content in contents.items():
            t0 = time.perf_counter()
            kept[nid], replies[nid] = site_stage(STAGES[stage], nid, kept.get(nid), content,
                                                 arrays[nid], counts[nid])
            site_s[nid] += time.perf_counter() - t0
            sent[nid] += _nbytes(replies[nid])
        return replies

    pks = at_sites(0, coord.setup())
    shared = at_sites(1, coord.on_keys(pks))
    masked = at_sites(2, coord.on_shares(shared))
    reveal = at_sites(3, coord.on_masked(masked))
    t0 = time.perf_counter()
    result = coord.on_unmask(reveal)
    server_s = time.perf_counter() - t0
    total = sum(counts.values())
    t0 = time.perf_counter()
    plain = [sum(arrays[n][i] * counts[n] for n in arrays) / total for i in range(len(keys))]
    mean_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain_bytes = sum(len(a.astype(np.float32).tobytes()) for a in arrays[1])
    serialise_s = time.perf_counter() - t0
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    return {"site_s": float(np.median(list(site_s.values()))), "serialise_s": serialise_s,
            "server_s": server_s, "mean_s": mean_s, "bytes_up": float(np.median(list(sent.values()))),
            "plain_bytes": float(plain_bytes), "error": err,
            "bound": error_bound(list(counts.values()), params)}


def rows_for(sites: int, m: dict[str, float]) -> list[BenchRow]:
    """Bench rows of one measurement (each with its plain-round counterpart as the baseline)."""
    return [
        BenchRow(f"SecAgg+ site compute / plain reply serialisation ({sites} sites)", m["site_s"] * 1e3, "ms",
                 m["serialise_s"] * 1e3, note="keys, shares, quantize + masks vs float32 tobytes"),
        BenchRow(f"SecAgg+ coordinator unmask / NumPy weighted mean ({sites} sites)", m["server_s"] * 1e3,
                 "ms", m["mean_s"] * 1e3, note="sum, seed + mask rebuild, dequantize"),
        BenchRow(f"SecAgg+ bytes up per site / plain float32 reply ({sites} sites)", m["bytes_up"] / 1e6,
                 "MB", m["plain_bytes"] / 1e6, note="keys + ciphertexts + masked uint32 + shares"),
        BenchRow(f"SecAgg+ max error / stated bound ({sites} sites)", m["error"] * 1e6, "1e-6",
                 m["bound"] * 1e6,
                 target="<= 1", note="vs plain example-weighted mean; quantization_range 2^22, clip 8"),
    ]


def run(quick: bool) -> list[BenchRow]:
    """8 and 42 sites (``quick``: 8 only)."""
    return [row for k in ((8,) if quick else (8, 42)) for row in rows_for(k, measure(k))]


def main(argv: list[str] | None = None) -> None:
    """Print the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 42])
    args = parser.parse_args(argv)
    for k in args.sites:
        for row in rows_for(k, measure(k)):
            print(f"{row.name:<72} {row.value:10.3f} {row.unit:<3} baseline {row.baseline:10.3f}  "
                  f"x{row.ratio:.2f}")


if __name__ == "__main__":
    main()
