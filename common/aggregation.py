"""How adapters from many hospitals become one: the aggregation math, without Flower.

Plain functions on explicit arguments (dicts of numpy arrays keyed like PEFT's adapter state,
``...q_proj.lora_A.weight`` / ``...q_proj.lora_B.weight``), so every rule is tested on
hand-built inputs and timed by ``simulations/bench/aggregation.py``. The Flower strategies in
``server/`` only decode replies and call these.

- :func:`weighted_mean`, :func:`coordinate_median`, :func:`trimmed_mean`: combine same-shaped
  adapters tensor by tensor (:func:`combine` picks one by name).
- :func:`update_norms` and :func:`norm_outliers`: flag a reply whose update is far larger than
  the others' (a diverged or malicious site).
- :func:`hetero_aggregate`: the exact example-weighted sum of the *updates* ``s_k B_k A_k`` of
  sites that trained at different ranks ``r_k`` (``s_k = alpha / r_k``, PEFT's scaling), never
  forming a dense ``d x n`` matrix, returned in SVD form at the global rank.
  :func:`truncate_adapter` gives a site the best rank-``r_k`` part of that global adapter.

Why not average A and B separately: ``mean(B) @ mean(A) != mean(B @ A)``. FedAvg of the factors
adds cross terms ``B_j A_k`` no site trained; ``hetero_aggregate`` sums the products instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fedmira.common.config import AGGREGATIONS

ArrayDict = dict[str, np.ndarray]

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
# Singular values below this many float epsilons of the largest are treated as zero: their
# directions carry no resolvable update and are re-seeded instead (see _factors).
RANK_TOL_EPS = 10.0
# Threads for the small dense linear algebra of hetero_aggregate. The matrices (a few hundred
# rows) gain little from a second thread, and OpenMP threads that spin on a core shared with
# simulated sites lose badly (measured 10-30x slower on 2 busy cores); see the benchmark.
LINALG_THREADS = 1
# ... and layers are instead solved in this many chunks on as many Python threads.
LINALG_WORKERS = 2


# ------------------------------------------------------------------------------ weights
def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1 (equal weights when all are zero).

    Raises
    ------
    ValueError
        On an empty, negative or non-finite weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"weights must be finite, non-negative and not empty, got {list(weights)}")
    total = w.sum()
    return w / total if total > 0 else np.full_like(w, 1.0 / w.size)


# ------------------------------------------------------------------------------ same-shape rules
def weighted_mean(states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> ArrayDict:
    """Example-weighted mean of each tensor (FedAvg), in float32 with a float64 accumulator."""
    w = normalized_weights(weights)
    out: ArrayDict = {}
    for key in states[0]:
        acc = np.zeros(states[0][key].shape, dtype=np.float64)
        for wk, state in zip(w, states):
            acc += wk * state[key]
        out[key] = acc.astype(np.float32)
    return out


def coordinate_median(states: Sequence[Mapping[str, np.ndarray]]) -> ArrayDict:
    """Coordinate-wise median of each tensor (unweighted: a site's size cannot buy influence)."""
    return {k: np.median(np.stack([s[k] for s in states]), axis=0).astype(np.float32) for k in states[0]}


def trimmed_mean(states: Sequence[Mapping[str, np.ndarray]], fraction: float) -> ArrayDict:
    """Coordinate-wise mean after dropping ``floor(fraction * K)`` values at each end (unweighted).

    With few replies nothing may be trimmed (e.g. K=3, fraction 0.1): it is then the plain mean.
    """
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    cut = int(fraction * len(states))
    out: ArrayDict = {}
    for key in states[0]:
        stacked = np.sort(np.stack([s[key] for s in states]), axis=0)
        out[key] = stacked[cut : len(states) - cut].mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


def combine(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], method: str = "mean",
    trim_fraction: float = 0.1,
) -> ArrayDict:
    """Aggregate same-shaped adapters by ``method``: mean | median | trimmed_mean."""
    if not states:
        raise ValueError("nothing to aggregate: no states")
    if method == "mean":
        return weighted_mean(states, weights)
    if method == "median":
        return coordinate_median(states)
    if method == "trimmed_mean":
        return trimmed_mean(states, trim_fraction)
    raise ValueError(f"unknown aggregation {method!r}; expected one of {', '.join(AGGREGATIONS)}")


# ------------------------------------------------------------------------------ outliers
def update_norms(
    states: Sequence[Mapping[str, np.ndarray]], references: Sequence[Mapping[str, np.ndarray]],
) -> list[float]:
    """L2 norm of each state's update ``state - reference`` over all its tensors."""
    norms = []
    for state, ref in zip(states, references, strict=True):
        sq = 0.0
        for k, v in state.items():
            diff = (v - ref[k]).ravel()
            sq += float(np.dot(diff, diff))  # BLAS dot: no squared copy of every tensor
        norms.append(math.sqrt(sq))
    return norms


def norm_outliers(norms: Sequence[float], factor: float) -> list[bool]:
    """Which norms exceed ``factor`` x the median of the *other* norms.

    Leave-one-out, so that with two replies a huge one is still caught (the median of both
    would be pulled up by the outlier itself). ``factor <= 0`` or a single reply: nothing is.
    """
    if factor <= 0 or len(norms) < 2:
        return [False] * len(norms)
    flags = []
    for i, n in enumerate(norms):
        others = float(np.median([m for j, m in enumerate(norms) if j != i]))
        flags.append(others > 0 and n > factor * others)
    return flags


# ------------------------------------------------------------------------------ LoRA structure
def lora_modules(keys: Sequence[str] | Mapping[str, object]) -> list[str]:
    """Return the module prefixes that have both a ``lora_A`` and a ``lora_B`` tensor, sorted.

    Raises
    ------
    ValueError
        When a key is neither, or a factor lacks its partner.
    """
    a = {k[: -len(LORA_A)] for k in keys if k.endswith(LORA_A)}
    b = {k[: -len(LORA_B)] for k in keys if k.endswith(LORA_B)}
    other = [k for k in keys if not (k.endswith(LORA_A) or k.endswith(LORA_B))]
    if other or a != b:
        raise ValueError(f"not a LoRA A/B adapter state: unpaired or foreign keys, e.g. "
                         f"{(other or sorted(a ^ b))[:2]}")
    return sorted(a)


def adapter_rank(state: Mapping[str, np.ndarray] | Mapping[str, torch.Tensor]) -> int:
    """Return the LoRA rank of an adapter state (rows of every A, columns of every B).

    Raises
    ------
    ValueError
        When the factors disagree on the rank.
    """
    ranks = {state[m + LORA_A].shape[0] for m in lora_modules(state)}
    ranks |= {state[m + LORA_B].shape[1] for m in lora_modules(state)}
    if len(ranks) != 1:
        raise ValueError(f"adapter factors disagree on the rank: {sorted(ranks)}")
    return int(ranks.pop())


def truncate_adapter(state: Mapping[str, np.ndarray], rank: int) -> ArrayDict:
    """Cut an adapter in SVD form (as :func:`hetero_aggregate` returns it) to rank ``rank``.

    Keeps the first ``rank`` columns of B and rows of A (the largest singular values) and
    multiplies each by ``sqrt(rank / r)``: PEFT scales an update by ``alpha / rank``, so the
    truncated adapter applies exactly the best rank-``rank`` approximation of the original
    update ``(alpha / r) B A``. A fresh PEFT adapter (B = 0) stays a zero update.
    """
    r = adapter_rank(state)
    if not 1 <= rank <= r:
        raise ValueError(f"cannot truncate a rank-{r} adapter to rank {rank}")
    if rank == r:
        return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    c = math.sqrt(rank / r)
    out: ArrayDict = {}
    for m in lora_modules(state):
        out[m + LORA_A] = (state[m + LORA_A][:rank] * c).astype(np.float32)
        out[m + LORA_B] = (state[m + LORA_B][:, :rank] * c).astype(np.float32)
    return out


# ------------------------------------------------------------------------------ exact low-rank sum
@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lowrank_sum_svd(
    b: torch.Tensor, a: torch.Tensor, coeffs: torch.Tensor, rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``M = b @ diag(coeffs) @ a`` without forming ``M``; batched.

    ``b`` is ``(L, d, R)`` (the stacked B factors ``[B_1 .. B_K]`` of L layers), ``a`` is
    ``(L, R, n)`` (``[A_1; ..; A_K]``) and ``coeffs`` ``(R,)`` (site k's weight times its
    scaling, repeated ``r_k`` times). With ``b = Q_B R_B`` and ``a^T = Q_A R_A`` (Householder QR),
    ``M = Q_B (R_B diag(c) R_A^T) Q_A^T``: only the small core ``C`` (at most R x R) needs an
    SVD. Its left singular vectors come from the symmetric eigendecomposition of ``C C^T``
    (same vectors, ~2x faster than an SVD at these sizes). ``Q_B`` and ``Q_A`` are never formed:
    their reflectors are applied to the ``rank`` vectors kept (``ormqr``), which halves the QR
    cost.

    Returns
    -------
    u : (L, d, rank), s : (L, rank), core_t : (L, rank, n)
        Orthonormal left singular vectors ``u``, singular values ``s`` (descending) and
        ``core_t = u^T M`` (rows ``s_i v_i^T``), so that ``u @ core_t`` is the best rank-``rank``
        approximation of ``M`` (exactly ``M`` when ``rank >= rank(M)``). ``s`` is taken as the
        norms of ``core_t``'s rows, accurate also where the squared eigenvalues are not.
    """
    qr_b, tau_b = torch.geqrf(b)
    qr_a, tau_a = torch.geqrf(a.transpose(-1, -2).contiguous())
    r_b = qr_b[..., : min(b.shape[-2], b.shape[-1]), :].triu()
    r_a = qr_a[..., : min(a.shape[-2], a.shape[-1]), :].triu()
    core = (r_b * coeffs) @ r_a.transpose(-1, -2)
    _, evecs = torch.linalg.eigh(core @ core.transpose(-1, -2))
    k = min(rank, evecs.shape[-1])
    w = evecs[..., -k:].flip(-1)  # eigh sorts ascending
    u = torch.ormqr(qr_b, tau_b, _pad_rows(w, b.shape[-2]))
    core_t = torch.ormqr(qr_a, tau_a, _pad_rows((w.transpose(-1, -2) @ core).transpose(-1, -2), a.shape[-1]))
    core_t = core_t.transpose(-1, -2)
    return u, core_t.norm(dim=-1), core_t


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` (..., p, k) with zero rows appended up to ``rows``: the input ``ormqr`` needs."""
    out = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
    out[..., : x.shape[-2], :] = x
    return out


def _factors(
    u: torch.Tensor, s: torch.Tensor, core_t: torch.Tensor, rank: int, scale: float, gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced LoRA factors ``B = U S^1/2 / sqrt(scale)``, ``A = S^-1/2 U^T M / sqrt(scale)``.

    PEFT applies ``scale * B @ A``, so this pair applies exactly ``U U^T M``. Directions with
    (numerically) zero singular value get ``B = 0`` and a fresh random A row (PEFT-like init,
    seeded): the update is unchanged, but the direction can still learn. With both factors zero
    it never could (each factor's gradient is proportional to the other).
    """
    n_layers, d, k = u.shape
    n = core_t.shape[-1]
    tol = RANK_TOL_EPS * torch.finfo(s.dtype).eps
    alive = s > tol * s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    root = torch.where(alive, s, torch.ones_like(s)).sqrt()
    b = torch.where(alive[:, None, :], u * root[:, None, :], 0.0) / math.sqrt(scale)
    a = torch.where(alive[..., None], core_t / root[..., None], 0.0) / math.sqrt(scale)
    b_out = torch.zeros(n_layers, d, rank, dtype=u.dtype)
    a_out = torch.empty(n_layers, rank, n, dtype=u.dtype).uniform_(-1, 1, generator=gen) / math.sqrt(n)
    b_out[..., :k] = b
    a_out[:, :k] = torch.where(alive[..., None], a, a_out[:, :k])
    return b_out, a_out


def hetero_aggregate(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], *, alpha: float, rank: int,
    seed: int = 0,
) -> ArrayDict:
    """Exact example-weighted sum of LoRA updates at mixed ranks, as a rank-``rank`` adapter.

    Site k's adapter (rank ``r_k`` = rows of its A) applies ``(alpha / r_k) B_k A_k``. The result
    is the best rank-``rank`` approximation of ``sum_k w_k (alpha / r_k) B_k A_k`` (normalized
    ``w``), written as factors for a rank-``rank`` PEFT adapter (scaling ``alpha / rank``) in SVD
    order, so :func:`truncate_adapter` can hand each site its best rank-``r_k`` part. When the
    sum has rank <= ``rank`` it is reproduced exactly (to float32 rounding).

    Layers with the same ``(d, n)`` are stacked and solved in batched calls, in
    ``LINALG_WORKERS`` chunks on as many threads; ``seed`` seeds the A rows re-drawn for
    directions that carry no update (see :func:`_factors`), per chunk, so the result does not
    depend on the scheduling.
    """
    w = normalized_weights(weights)
    ranks = [adapter_rank(s) for s in states]
    coeffs = torch.tensor(np.repeat(w * alpha / np.asarray(ranks, dtype=np.float64), ranks))
    groups = _by_shape(states[0], lora_modules(states[0]))
    chunks = [chunk for group in groups for chunk in _split(group, LINALG_WORKERS)]

    def solve(job: tuple[int, list[str]]) -> ArrayDict:
        index, chunk = job
        b, a = _stacked(states, chunk, ranks)
        u, s, core_t = lowrank_sum_svd(b, a, coeffs.to(b.dtype), rank)
        gen = torch.Generator().manual_seed(seed * 1000 + index)
        b_out, a_out = _factors(u, s, core_t, rank, alpha / rank, gen)
        out = {m + LORA_B: b_out[i].numpy().astype(np.float32) for i, m in enumerate(chunk)}
        return {**out, **{m + LORA_A: a_out[i].numpy().astype(np.float32) for i, m in enumerate(chunk)}}

    # torch releases the GIL inside LAPACK, so single-threaded solves on separate Python threads
    # use both cores without OpenMP's spinning barriers (see LINALG_THREADS).
    with _torch_threads(LINALG_THREADS), ThreadPoolExecutor(max(1, LINALG_WORKERS)) as pool:
        parts = list(pool.map(solve, enumerate(chunks)))
    return dict(sorted(kv for part in parts for kv in part.items()))


def _split(modules: list[str], n: int) -> list[list[str]]:
    """``modules`` in at most ``n`` contiguous chunks of nearly equal size."""
    n = max(1, min(n, len(modules)))
    size = -(-len(modules) // n)
    return [modules[i : i + size] for i in range(0, len(modules), size)]


def _stacked(
    states: Sequence[Mapping[str, np.ndarray]], modules: Sequence[str], ranks: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B_1 .. B_K]`` as (L, d, R) and ``[A_1; ..; A_K]`` as (L, R, n) for the L ``modules``.

    Filled in place (one copy of the factors, not a concatenate and then a stack).
    """
    first = states[0][modules[0] + LORA_B]
    dtype = np.result_type(*(s[modules[0] + LORA_B].dtype for s in states))
    d, n, total = first.shape[0], states[0][modules[0] + LORA_A].shape[1], sum(ranks)
    b = np.empty((len(modules), d, total), dtype=dtype)
    a = np.empty((len(modules), total, n), dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(ranks)])
    for i, m in enumerate(modules):
        for k, state in enumerate(states):
            b[i, :, offsets[k] : offsets[k + 1]] = state[m + LORA_B]
            a[i, offsets[k] : offsets[k + 1]] = state[m + LORA_A]
    return torch.from_numpy(b), torch.from_numpy(a)


def _by_shape(state: Mapping[str, np.ndarray], modules: Sequence[str]) -> list[list[str]]:
    """Modules grouped by their (out, in) dimensions, so each group is one batched solve."""
    groups: dict[tuple[int, int], list[str]] = {}
    for m in modules:
        groups.setdefault((state[m + LORA_B].shape[0], state[m + LORA_A].shape[1]), []).append(m)
    return list(groups.values())


def dense_update(state: Mapping[str, np.ndarray], alpha: float) -> ArrayDict:
    """``(alpha / r) B @ A`` per module, in float64: for tests and checks on small models only."""
    r = adapter_rank(state)
    return {m: (alpha / r) * (state[m + LORA_B].astype(np.float64) @ state[m + LORA_A].astype(np.float64))
            for m in lora_modules(state)}
