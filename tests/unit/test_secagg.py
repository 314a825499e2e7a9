"""SecAgg+ core: the sum is FedAvg's within the stated bound, single vectors stay hidden, dropouts.

Each test plays the coordinator by hand: it routes what each stage returns to the sites, as the
ServerApp will, and can drop a site at any stage.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedmira.common.secagg import (
    STAGES,
    CoordinatorRound,
    SecAggError,
    SecAggParams,
    SecureSum,
    SiteSecAgg,
    error_bound,
    mask,
    neighbour_graph,
    quantize_weighted,
    site_from_record,
    site_stage,
    site_to_record,
    unmask_sum,
)

SHAPES = [(4, 8), (8, 4)]


def _adapters(n: int, seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {nid: [rng.normal(0, 0.05, s) for s in SHAPES] for nid in range(1, n + 1)}


def _fedavg(
    adapters: dict[int, list[np.ndarray]], counts: dict[int, int], ids: Sequence[int],
) -> list[np.ndarray]:
    total = sum(counts[i] for i in ids)
    return [sum(adapters[i][k] * counts[i] for i in ids) / total for k in range(len(SHAPES))]


def _round(n: int, params: SecAggParams, *, drop_at: dict[int, int] | None = None,
           counts: dict[int, int] | None = None, log: list | None = None) -> tuple[SecureSum, dict, dict]:
    """Run one round; ``drop_at`` maps a node id to the stage (0-3) it fails at."""
    np.random.seed(0)  # Flower's quantize rounds with NumPy's global generator
    drop_at = drop_at or {}
    adapters = _adapters(n)
    counts = counts or {nid: 10 * nid for nid in adapters}
    graph = neighbour_graph(list(adapters), params.num_shares, seed=1)
    sites = {nid: SiteSecAgg(nid, params, graph[nid]) for nid in adapters}
    alive = lambda stage: [nid for nid in sites if drop_at.get(nid, 99) > stage]  # noqa: E731
    pks = {nid: sites[nid].advertise_keys() for nid in alive(0)}
    outbox = {nid: sites[nid].share_keys(pks) for nid in alive(1)}
    sharers = list(outbox)
    inbox: dict[int, dict[int, bytes]] = {nid: {} for nid in sites}
    for src, msgs in outbox.items():
        for dst, blob in msgs.items():
            inbox[dst][src] = blob
    masked = {nid: sites[nid].masked_vector(inbox[nid], adapters[nid], counts[nid]) for nid in alive(2)
              if nid in sharers}
    if log is not None:
        log.extend([pks, outbox, masked])
    survivors = set(masked)
    dropped = set(sharers) - survivors
    shares = [sites[nid].unmask(sorted(graph[nid] & survivors), sorted(graph[nid] & dropped))
              for nid in alive(3) if nid in survivors]
    if log is not None:
        log.append(shares)
    result = unmask_sum(masked, shares, pks, graph, sharers, params)
    return result, adapters, counts


def test_sum_matches_fedavg_within_the_stated_bound() -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=3)
    result, adapters, counts = _round(8, params)
    plain = _fedavg(adapters, counts, list(adapters))
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    bound = error_bound(list(counts.values()), params)
    assert err <= bound
    assert err > 0  # quantization is not free: the check above can fail
    # Each weight is rounded to max_weight / quantization_range examples.
    step = params.max_weight / (2 * params.quantization_range)
    assert abs(result.total_weight - sum(counts.values())) <= 8 * step
    assert result.survivors == tuple(range(1, 9)) and result.dropped == ()


def test_coarse_quantization_error_is_bounded_and_visible() -> None:
    params = SecAggParams(num_shares=3, reconstruction_threshold=2, quantization_range=2**10, max_weight=1000)
    result, adapters, counts = _round(4, params)
    plain = _fedavg(adapters, counts, list(adapters))
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    assert 1e-4 < err <= error_bound(list(counts.values()), params)


def test_no_single_adapter_can_be_read_from_what_the_server_receives() -> None:
    params = SecAggParams(num_shares=3, reconstruction_threshold=2)
    log: list = []
    _round(5, params, log=log)
    pks, outbox, masked, shares = log
    np.random.seed(0)
    adapters = _adapters(5)
    for nid, vec in masked.items():
        _, plain = quantize_weighted(adapters[nid], 10 * nid, params)
        # A masked vector looks uniform over the modulus, nothing like the quantized adapter.
        assert all(not np.array_equal(m, q) for m, q in zip(vec, plain))
        assert all(v.dtype == np.uint32 for v in vec)  # modulus 2**32: 4 bytes per value on the wire
        spread = np.concatenate([v.ravel() for v in vec[1:]]) / params.modulus_range
        assert 0.35 < spread.mean() < 0.65 and spread.std() > 0.2
    # With nobody dropped, stage 3 hands over seed shares of survivors only (no sk1 share).
    assert {owner for reply in shares for owner in reply} == set(masked)
    # The shares that pass through the coordinator are encrypted (it cannot combine them).
    for msgs in outbox.values():
        for blob in msgs.values():
            assert blob.startswith(b"gAAAA")  # Fernet tokens


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_site_dropping_before_unmask_is_recovered(stage: int) -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=3)
    result, adapters, counts = _round(7, params, drop_at={3: stage})
    alive = [nid for nid in adapters if nid != 3]
    plain = _fedavg(adapters, counts, alive)
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    assert err <= error_bound([counts[i] for i in alive], params)
    assert 3 not in result.survivors
    assert result.dropped == ((3,) if stage == 2 else ())


def test_a_site_dropping_during_unmask_still_counts() -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=3)
    result, adapters, counts = _round(7, params, drop_at={3: 3})
    plain = _fedavg(adapters, counts, list(adapters))  # its masked vector arrived
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    assert err <= error_bound(list(counts.values()), params)


def test_below_the_threshold_the_round_fails_cleanly() -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=4)
    with pytest.raises(SecAggError, match="shares came back"):
        _round(5, params, drop_at={1: 2, 2: 3})


def test_a_site_refuses_to_reveal_both_secrets_of_one_site() -> None:
    params = SecAggParams(num_shares=3, reconstruction_threshold=2)
    graph = neighbour_graph([1, 2, 3], 3)
    sites = {n: SiteSecAgg(n, params, graph[n]) for n in graph}
    pks = {n: s.advertise_keys() for n, s in sites.items()}
    out = {n: s.share_keys(pks) for n, s in sites.items()}
    inbox = {n: {src: msgs[n] for src, msgs in out.items() if n in msgs} for n in sites}
    sites[1].masked_vector(inbox[1], _adapters(3)[1], 5)
    with pytest.raises(SecAggError, match="both secrets"):
        sites[1].unmask([2, 3], [2])


def test_params_are_validated_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="num_shares"):
        SecAggParams(num_shares=4)
    with pytest.raises(ValueError, match="reconstruction_threshold"):
        SecAggParams(num_shares=3, reconstruction_threshold=3)
    with pytest.raises(ValueError, match="modulus_range"):
        SecAggParams(modulus_range=3 * 2**20)
    with pytest.raises(SecAggError, match="max_weight"):
        quantize_weighted([np.zeros(2)], 10, SecAggParams(max_weight=5))
    with pytest.raises(SecAggError, match="clipping_range"):
        quantize_weighted([np.full(2, 3.0)], 10, SecAggParams(clipping_range=2.0, max_weight=10))
    assert quantize_weighted([np.full(2, 1.9)], 10, SecAggParams(clipping_range=2.0, max_weight=10))[0] > 0


def test_graph_is_symmetric_and_sized() -> None:
    graph = neighbour_graph(list(range(1, 43)), 5, seed=3)
    assert all(len(g) == 5 and n in g for n, g in graph.items())
    assert all(n in graph[m] for n, g in graph.items() for m in g)
    assert neighbour_graph([1, 2], 5) == {1: frozenset({1, 2}), 2: frozenset({1, 2})}


def test_mask_is_deterministic_uniform_and_key_dependent() -> None:
    a = mask(b"k1", [(1000,)], 2**32)[0]
    assert np.array_equal(a, mask(b"k1", [(1000,)], 2**32)[0])
    assert not np.array_equal(a, mask(b"k2", [(1000,)], 2**32)[0])
    assert a.min() >= 0 and a.max() < 2**32
    assert abs(a.mean() / 2**32 - 0.5) < 0.05


# ---------------------------------------------------------------- coordinator + stateless sites
def _message_round(n: int, params: SecAggParams, drop_at: dict[int, int] | None = None) -> tuple:
    """A round as the apps run it: every content and every kept state passes through a ConfigRecord."""
    np.random.seed(0)
    drop_at = drop_at or {}
    adapters = _adapters(n)
    counts = {nid: 10 * nid for nid in adapters}
    coord = CoordinatorRound(list(adapters), params, seed=2)
    kept: dict[int, ConfigRecord] = {}

    def stage(k: int, contents: dict[int, dict]) -> dict[int, object]:
        replies = {}
        for nid, content in contents.items():
            if drop_at.get(nid, 99) <= k:
                continue
            state = dict(kept[nid]) if nid in kept else None
            new, reply = site_stage(STAGES[k], nid, state, dict(ConfigRecord(content)),
                                    adapters[nid], counts[nid])
            kept[nid] = ConfigRecord(new)  # what context.state would hold
            replies[nid] = reply
        return replies

    keys = stage(0, coord.setup())
    shares = stage(1, coord.on_keys(keys))
    masked = stage(2, coord.on_shares(shares))
    unmask = stage(3, coord.on_masked(masked))
    return coord.on_unmask(unmask), adapters, counts


@pytest.mark.parametrize("drop_at", [{}, {2: 0}, {2: 1}, {2: 2}, {2: 3}, {2: 2, 5: 1}])
def test_message_round_with_stateless_sites_matches_fedavg(drop_at: dict[int, int]) -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=3)
    result, adapters, counts = _message_round(6, params, drop_at)
    counted = [nid for nid in adapters if drop_at.get(nid, 99) > 2]  # sent a masked vector
    plain = _fedavg(adapters, counts, counted)
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    assert err <= error_bound([counts[i] for i in counted], params)
    assert list(result.survivors) == counted


def test_message_round_below_threshold_fails_and_names_the_cause() -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=4)
    with pytest.raises(SecAggError, match="too many sites dropped"):
        _message_round(5, params, {1: 2, 2: 3})


def test_site_state_round_trips_and_guards_its_owner() -> None:
    params = SecAggParams()
    site = SiteSecAgg(7, params, frozenset({6, 7, 8}))
    site.advertise_keys()
    back = site_from_record(dict(ConfigRecord(site_to_record(site))))
    assert site_to_record(back) == site_to_record(site)
    with pytest.raises(SecAggError, match="belongs to site 7"):
        site_stage("share_keys", 8, site_to_record(site), {"pk_ids": [], "pk1": [], "pk2": []})
    with pytest.raises(SecAggError, match="before advertise_keys"):
        site_stage("unmask", 7, None, {})


def test_coordinator_refuses_fewer_sites_than_the_threshold() -> None:
    with pytest.raises(SecAggError, match="reconstruction_threshold"):
        CoordinatorRound([1], SecAggParams())


def test_a_malformed_masked_vector_counts_as_a_dropout() -> None:
    params = SecAggParams(num_shares=5, reconstruction_threshold=3)
    np.random.seed(0)
    adapters = _adapters(5)
    coord = CoordinatorRound(list(adapters), params)
    sites: dict[int, SiteSecAgg] = {}
    keys = {}
    for nid, content in coord.setup().items():
        sites[nid] = SiteSecAgg(nid, params, frozenset(content["neighbours"]))
        keys[nid] = sites[nid].advertise_keys()
    shares = {nid: sites[nid].share_keys(dict(zip(c["pk_ids"], zip(c["pk1"], c["pk2"]))))
              for nid, c in coord.on_keys(keys).items()}
    masked = {nid: sites[nid].masked_vector(dict(zip(c["src_ids"], c["ciphertexts"])), adapters[nid], 10)
              for nid, c in coord.on_shares(shares).items()}
    masked[4] = [a[:1] for a in masked[4]]  # wrong shapes
    asks = coord.on_masked(masked)
    assert 4 not in asks and all(a["dropped"] == [4] for a in asks.values())  # 5 sites: all neighbours
    result = coord.on_unmask({nid: sites[nid].unmask(a["survivors"], a["dropped"])
                              for nid, a in asks.items()})
    plain = _fedavg(adapters, {n: 10 for n in adapters}, [1, 2, 3, 5])
    err = max(float(np.abs(a - b).max()) for a, b in zip(result.mean, plain))
    assert err <= error_bound([10] * 4, params)
    assert result.dropped == (4,)


def test_a_sites_secrets_never_appear_in_its_repr() -> None:
    site = SiteSecAgg(1, SecAggParams(), frozenset({1, 2, 3}), random_bytes=lambda n: b"S" * n)
    site.advertise_keys()
    text = repr(site)
    assert "SSSS" not in text and "PRIVATE" not in text and "node_id=1" in text
