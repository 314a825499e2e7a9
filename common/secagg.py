"""SecAgg+ as plain functions: the coordinator learns only the weighted sum of the sites' adapters.

This is the protocol of Bell et al. (CCS 2020), as Flower's legacy ``SecAggPlusWorkflow`` and
``secaggplus_mod`` run it, taken apart from Flower's messaging so that the Message API
(``ServerApp`` / ``ClientApp`` with ArrayRecords) can drive it stage by stage:

0. **advertise keys**: each site makes two EC key pairs: ``sk1/pk1`` for the pairwise masks, and
   ``sk2/pk2`` to encrypt what it sends to other sites. It also draws a seed for its own mask.
1. **share keys**: each site splits its mask seed and ``sk1`` into Shamir shares, one for each
   neighbour (itself included), and encrypts each share for that neighbour. The coordinator
   only routes the ciphertexts.
2. **masked vectors**: each site weights its adapter by its example count and quantizes it. It
   then adds its own mask and the pairwise masks it shares with each neighbour that shared keys
   (``+`` towards a lower node id, ``-`` towards a higher one), mod ``modulus_range``.
3. **unmask**: each survivor hands over the shares it holds. For a survivor it gives the seed
   share (the coordinator removes that site's own mask from the sum). For a site that dropped
   after sharing keys it gives the ``sk1`` share (the coordinator removes the pairwise masks the
   dropped site's neighbours added for it). A site never gives both for the same site.

In the sum the pairwise masks cancel, so what is left is the sum of the quantized, weighted
adapters. That sum, and the total weight, is all the coordinator can compute.

Library first: key agreement (ECDH + HKDF), Shamir sharing, Fernet encryption, the plaintext
layout of a share and stochastic quantization all come from ``flwr.common.secure_aggregation``
and ``flwr.supercore.primitives``. The **mask generator is the one piece written here**, and on
purpose. Flower's ``pseudo_rand_gen`` folds the 32-byte key into a 32-bit seed for NumPy's
Mersenne Twister, so a mask has only 2^32 possible values, and a coordinator can try them all.
Here each mask is the ChaCha20 keystream of ``cryptography`` (a CSPRNG, keyed with
SHA-256(key)), read as unsigned integers; the modulus is a power of two, so there is no modulo
bias.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedmira.common.errors import FedmiraError

Arrays = list[np.ndarray]


class SecAggError(FedmiraError):
    """A SecAgg+ round cannot finish: too few sites or shares left, or a message out of place."""


@dataclass(frozen=True)
class SecAggParams:
    """Settings of a SecAgg+ round (the names are those of Flower's ``SecAggPlusWorkflow``).

    Parameters
    ----------
    num_shares : int
        Sites each site shares its secrets with, itself included (odd, >= 3).
    reconstruction_threshold : int
        Shares needed to rebuild a secret (>= 2, < num_shares). Higher: more colluding sites
        needed to unmask one site; lower: more dropouts survived.
    clipping_range : float
        Adapter values are clipped to [-clipping_range, clipping_range] before quantization.
    quantization_range : int
        Integer levels of the quantized range; the error per value is about 2 * clipping_range /
        quantization_range, divided by the total weight share (see :func:`error_bound`).
    modulus_range : int
        Arithmetic is mod this power of two (<= 2**62); it must exceed sites x quantization_range.
    max_weight : float
        The largest example count a site may report: weights are count / max_weight.
    """

    num_shares: int = 3
    reconstruction_threshold: int = 2
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 100_000.0

    def __post_init__(self) -> None:
        if self.num_shares < 3 or self.num_shares % 2 == 0:
            raise ValueError(f"secagg.num_shares must be an odd number >= 3, got {self.num_shares}.")
        if not 2 <= self.reconstruction_threshold < self.num_shares:
            raise ValueError(
                "secagg.reconstruction_threshold must be in [2, num_shares - 1] = "
                f"[2, {self.num_shares - 1}], got {self.reconstruction_threshold}.")
        if self.clipping_range <= 0 or self.max_weight <= 0:
            raise ValueError("secagg.clipping_range and secagg.max_weight must be > 0.")
        m = self.modulus_range
        if m & (m - 1) or not 2 <= m <= 2**62:
            raise ValueError(f"secagg.modulus_range must be a power of two <= 2**62, got {m}.")
        if not 2 <= self.quantization_range < m:
            raise ValueError(f"secagg.quantization_range must be in [2, modulus_range), got "
                             f"{self.quantization_range}.")

    @property
    def max_sites(self) -> int:
        """Most sites whose quantized sum still fits the modulus without wrapping."""
        return self.modulus_range // self.quantization_range - 1


def neighbour_graph(node_ids: Sequence[int], num_shares: int, seed: int = 0) -> dict[int, frozenset[int]]:
    """Map each site to its ``num_shares`` neighbours (itself included) on a shuffled ring.

    With fewer sites than ``num_shares`` every site is every site's neighbour (plain SecAgg).
    """
    ids = sorted(set(node_ids))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    if n <= num_shares:
        return {i: frozenset(ids) for i in ids}
    half = num_shares // 2
    return {nid: frozenset(ids[(pos + off) % n] for off in range(-half, half + 1))
            for pos, nid in enumerate(ids)}


def mask(key: bytes, shapes: Sequence[tuple[int, ...]], modulus: int) -> Arrays:
    """Uniform integers in [0, modulus) for each shape, from the ChaCha20 keystream of ``key``.

    ``modulus`` is a power of two <= 2**62, so masking the low bits of a uint64 is unbiased.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    cipher = Cipher(algorithms.ChaCha20(hashlib.sha256(key).digest(), b"\x00" * 16), mode=None)
    stream = cipher.encryptor().update(b"\x00" * (8 * sum(sizes)))
    flat = (np.frombuffer(stream, dtype="<u8") & np.uint64(modulus - 1)).astype(np.int64)
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def _add(a: Arrays, b: Arrays, sign: int, modulus: int) -> Arrays:
    return [(x + sign * y) & (modulus - 1) for x, y in zip(a, b)]


def _pair_key(sk1: bytes, pk1: bytes) -> bytes:
    return generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(pk1))


@dataclass
class SiteSecAgg:
    """One site's side of a SecAgg+ round: what it keeps between the four stages.

    Nothing here is sent except what each stage method returns.
    """

    node_id: int
    params: SecAggParams
    neighbours: frozenset[int]
    random_bytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)
    # Secrets: never in a repr (so never in a log line or an exception message).
    _sk1: bytes = field(default=b"", init=False, repr=False)
    _sk2: bytes = field(default=b"", init=False, repr=False)
    _seed: bytes = field(default=b"", init=False, repr=False)
    _pks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, init=False, repr=False)
    _seed_shares: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)
    _sk1_shares: dict[int, bytes] = field(default_factory=dict, init=False, repr=False)
    _masked: bool = field(default=False, init=False)

    def advertise_keys(self) -> tuple[bytes, bytes]:
        """Stage 0: make the key pairs and the mask seed; return the public keys (pk1, pk2)."""
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self._sk1, self._sk2 = private_key_to_bytes(sk1), private_key_to_bytes(sk2)
        self._seed = self.random_bytes(32)
        return public_key_to_bytes(pk1), public_key_to_bytes(pk2)

    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1: encrypted shares of the seed and of sk1, one per neighbour that advertised keys."""
        self._pks = {nid: pk for nid, pk in public_keys.items() if nid in self.neighbours}
        if self.node_id not in self._pks or len(self._pks) < self.params.reconstruction_threshold:
            raise SecAggError(f"site {self.node_id}: {len(self._pks)} neighbours advertised keys; "
                              f"the threshold is {self.params.reconstruction_threshold}.")
        ids = sorted(self._pks)
        t = self.params.reconstruction_threshold
        seed_shares = create_shares(self._seed, t, len(ids))
        sk1_shares = create_shares(self._sk1, t, len(ids))
        out: dict[int, bytes] = {}
        for nid, b_share, s_share in zip(ids, seed_shares, sk1_shares):
            plain = share_keys_plaintext_concat(self.node_id, nid, b_share, s_share)
            if nid == self.node_id:  # a site keeps its own share; it never crosses the wire
                self._seed_shares[nid], self._sk1_shares[nid] = b_share, s_share
                continue
            out[nid] = encrypt(_pair_key(self._sk2, self._pks[nid][1]), plain)
        return out

    def masked_vector(self, ciphertexts: Mapping[int, bytes], arrays: Arrays, num_examples: int) -> Arrays:
        """Stage 2: the weighted, quantized adapter plus the own and pairwise masks, mod the modulus.

        ``ciphertexts`` are the shares the neighbours sent this site (source node id -> bytes);
        the neighbours that sent one are the ones this site masks with.
        """
        p = self.params
        for src, blob in ciphertexts.items():
            if src not in self._pks or src == self.node_id:
                raise SecAggError(f"site {self.node_id}: a share from site {src}, not a neighbour.")
            got_src, dst, b_share, s_share = share_keys_plaintext_separate(
                decrypt(_pair_key(self._sk2, self._pks[src][1]), blob))
            if (got_src, dst) != (src, self.node_id):
                raise SecAggError(f"site {self.node_id}: a share addressed {got_src}->{dst} came as "
                                  f"{src}->{self.node_id}.")
            self._seed_shares[src], self._sk1_shares[src] = b_share, s_share
        if len(self._seed_shares) < p.reconstruction_threshold:
            raise SecAggError(f"site {self.node_id}: shares from {len(self._seed_shares)} sites; the "
                              f"threshold is {p.reconstruction_threshold}.")
        q_ratio, vec = quantize_weighted(arrays, num_examples, p)
        shapes = [v.shape for v in vec]
        vec = _add(vec, mask(self._seed, shapes, p.modulus_range), +1, p.modulus_range)
        for nid in ciphertexts:  # the neighbours that shared keys with this site
            pair = mask(_pair_key(self._sk1, self._pks[nid][0]), shapes, p.modulus_range)
            vec = _add(vec, pair, +1 if self.node_id > nid else -1, p.modulus_range)
        self._masked = True
        # Every value is < modulus: with the default 2**32 it travels as uint32, as small as float32.
        wire = np.uint32 if p.modulus_range <= 2**32 else np.int64
        return [v.astype(wire) for v in vec]

    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """Stage 3: seed shares of the surviving neighbours, sk1 shares of the dropped ones."""
        if not self._masked:
            raise SecAggError(f"site {self.node_id}: asked to unmask before it sent a masked vector.")
        both = set(survivors) & set(dropped)
        if both:  # with both shares of one site the coordinator could unmask its vector alone
            raise SecAggError(f"site {self.node_id}: sites {sorted(both)} are listed as survivors and as "
                              "dropped; refusing to reveal both secrets of a site.")
        out = {nid: self._seed_shares[nid] for nid in survivors if nid in self._seed_shares}
        out.update({nid: self._sk1_shares[nid] for nid in dropped if nid in self._sk1_shares})
        return out


def quantize_weighted(arrays: Arrays, num_examples: int, params: SecAggParams) -> tuple[int, Arrays]:
    """Weight ``arrays`` by ``num_examples / max_weight`` and quantize them (weight first, as an array).

    Stochastic rounding (Flower's ``quantize``) makes the quantized value unbiased. A site that
    trained nothing (``num_examples`` 0: its privacy budget is spent) sends weight 0, and its
    vector (zeros) sums to nothing; it still takes part in the protocol, so it is no dropout.
    """
    if not 0 <= num_examples <= params.max_weight:
        raise SecAggError(f"num_examples {num_examples} is outside [0, strategy.secagg_max_weight="
                          f"{params.max_weight:g}]; raise strategy.secagg_max_weight.")
    q_ratio = 0
    if num_examples:  # a trained site keeps at least one level of weight
        q_ratio = max(1, round(num_examples / params.max_weight * params.quantization_range))
    scaled = [np.asarray(a, dtype=np.float64) * (q_ratio / params.quantization_range) for a in arrays]
    # Flower's quantize clips silently; a clipped value would corrupt the sum without a trace.
    worst = max((float(np.abs(a).max()) for a in scaled if a.size), default=0.0)
    if worst > params.clipping_range:
        raise SecAggError(f"An adapter value of {worst:.3g} (after weighting) exceeds "
                          f"strategy.secagg_clipping_range={params.clipping_range:g}; raise it.")
    quant = quantize(scaled, params.clipping_range, params.quantization_range)
    return q_ratio, [np.array([q_ratio], dtype=np.int64)] + [q.astype(np.int64) for q in quant]


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learns: the weighted mean of the survivors' adapters and their weight."""

    mean: Arrays
    total_weight: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def unmask_sum(
    masked: Mapping[int, Arrays],
    shares: Sequence[Mapping[int, bytes]],
    public_keys: Mapping[int, tuple[bytes, bytes]],
    graph: Mapping[int, frozenset[int]],
    sharers: Sequence[int],
    params: SecAggParams,
) -> SecureSum:
    """Remove the masks from the sum of ``masked`` with the survivors' ``shares``.

    ``sharers`` are the sites that completed stage 1 (the ones others masked with); those of them
    missing from ``masked`` dropped. ``shares`` are the stage-3 replies (owner node id -> share).

    Raises
    ------
    SecAggError
        Too many survivors for the modulus, or fewer than the threshold of shares for a secret.
    """
    p, m = params, params.modulus_range
    survivors = sorted(masked)
    dropped = sorted(set(sharers) - set(masked))
    if not survivors:
        raise SecAggError("No site sent a masked vector; the round has nothing to aggregate.")
    if len(survivors) > p.max_sites:
        raise SecAggError(f"{len(survivors)} sites overflow modulus_range / quantization_range; raise "
                          "the modulus or lower strategy.secagg_quantization_range.")
    total = [np.zeros(a.shape, dtype=np.int64) for a in masked[survivors[0]]]
    for nid in survivors:  # int64 here: uint32 wire values would wrap, or turn float when negated
        total = _add(total, [a.astype(np.int64) for a in masked[nid]], +1, m)
    shapes = [a.shape for a in total]
    collected: dict[int, list[bytes]] = {}
    for reply in shares:
        for owner, share in reply.items():
            collected.setdefault(owner, []).append(share)
    for nid in survivors + dropped:
        got = collected.get(nid, [])
        if len(got) < p.reconstruction_threshold:
            raise SecAggError(f"Site {nid}: {len(got)} shares came back, {p.reconstruction_threshold} are "
                              "needed; too many sites dropped for this round (it can be run again).")
        secret = combine_shares(got[: p.reconstruction_threshold])
        if nid in masked:
            total = _add(total, mask(secret, shapes, m), -1, m)
            continue
        for other in graph[nid] & set(survivors):  # masks survivors added for the dropped site
            pair = mask(_pair_key(secret, public_keys[other][0]), shapes, m)
            total = _add(total, pair, -1 if other > nid else +1, m)
    return _finish(total, survivors, dropped, p)


def _finish(total: Arrays, survivors: list[int], dropped: list[int], p: SecAggParams) -> SecureSum:
    """Dequantize the unmasked sum: the weighted mean and the total weight (the first array)."""
    q_total, body = int(total[0][0]), total[1:]
    if q_total == 0:
        raise SecAggError("The survivors' total weight is 0 (every site trained nothing): no mean to take.")
    values = dequantize(body, p.clipping_range, p.quantization_range)
    # Each site's values were shifted by +clipping_range; dequantize removed one shift.
    mean = [(v - (len(survivors) - 1) * p.clipping_range) * (p.quantization_range / q_total) for v in values]
    weight = q_total / p.quantization_range * p.max_weight
    return SecureSum(mean, weight, tuple(survivors), tuple(dropped))


def error_bound(num_examples: Sequence[int], params: SecAggParams) -> float:
    """Largest |secure mean - plain weighted mean| per value, for values within the clipping range.

    Two sources: stochastic rounding (< one level, 2c/Q, per site) and the weight's own rounding
    (|q_i/Q - n_i/W| <= 1/(2Q)), which shifts the mean by at most 2c * sum|dw| / sum(w).
    """
    q, c = params.quantization_range, params.clipping_range
    exact = [n / params.max_weight for n in num_examples]
    rounded = [max(1, round(w * q)) / q if w else 0.0 for w in exact]
    wsum = sum(rounded)
    rounding = len(num_examples) * (2 * c / q) / wsum
    weighting = 2 * c * sum(abs(a - b) for a, b in zip(rounded, exact)) / wsum
    return rounding + weighting


# ------------------------------------------------------------------------------------------------
# Between messages: a site's state as ConfigRecord values, and the coordinator's round
# ------------------------------------------------------------------------------------------------
#: The stages in order; each is one round trip of Messages between the coordinator and the sites.
STAGES = ("advertise_keys", "share_keys", "masked_vector", "unmask")
#: Message type of the key and unmask stages (the ClientApp's ``@app.train("secagg")``); the
#: masked-vector stage rides on the strategy's own ``train`` message.
STAGE_MESSAGE_TYPE = "train.secagg"
#: The ConfigRecord that carries a stage's content both ways, and a site's state between stages.
RECORD = "secagg"
#: The masked vector's first array (in an ArrayRecord): the site's quantized weight.
WEIGHT_KEY = "secagg.weight"
_PARAM_FIELDS = ("num_shares", "reconstruction_threshold", "clipping_range", "quantization_range",
                 "modulus_range", "max_weight")


def params_to_record(params: SecAggParams) -> dict[str, int | float]:
    """Return the settings as ConfigRecord values (what the coordinator sends at stage 0)."""
    return {f"secagg.{name}": getattr(params, name) for name in _PARAM_FIELDS}


def params_from_record(record: Mapping[str, object]) -> SecAggParams:
    """Rebuild (and so re-validate) the settings a site received."""
    values: dict[str, Any] = {name: record[f"secagg.{name}"] for name in _PARAM_FIELDS}
    return SecAggParams(**values)


def _pairs(d: Mapping[int, bytes]) -> tuple[list[int], list[bytes]]:
    ids = sorted(d)
    return ids, [d[i] for i in ids]


def site_to_record(site: SiteSecAgg) -> dict[str, object]:
    """Return a site's protocol state as ConfigRecord values (ints, bytes and lists of them).

    A ClientApp may be a fresh process for every message, so the state between stages lives in
    the node's ``context.state``, which never leaves the site.
    """
    pk_ids = sorted(site._pks)
    seed_ids, seed_shares = _pairs(site._seed_shares)
    sk1_ids, sk1_shares = _pairs(site._sk1_shares)
    return {**params_to_record(site.params), "node_id": site.node_id, "neighbours": sorted(site.neighbours),
            "sk1": site._sk1, "sk2": site._sk2, "seed": site._seed, "pk_ids": pk_ids,
            "pk1": [site._pks[i][0] for i in pk_ids], "pk2": [site._pks[i][1] for i in pk_ids],
            "seed_share_ids": seed_ids, "seed_shares": seed_shares, "sk1_share_ids": sk1_ids,
            "sk1_shares": sk1_shares, "masked": int(site._masked)}


def site_from_record(record: Mapping[str, object]) -> SiteSecAgg:
    """Rebuild a site's protocol state saved by :func:`site_to_record`."""
    r: Mapping[str, Any] = record
    site = SiteSecAgg(int(r["node_id"]), params_from_record(r), frozenset(r["neighbours"]))
    site._sk1, site._sk2, site._seed = r["sk1"], r["sk2"], r["seed"]
    site._pks = {i: (a, b) for i, a, b in zip(r["pk_ids"], r["pk1"], r["pk2"])}
    site._seed_shares = dict(zip(r["seed_share_ids"], r["seed_shares"]))
    site._sk1_shares = dict(zip(r["sk1_share_ids"], r["sk1_shares"]))
    site._masked = bool(r["masked"])
    return site


@dataclass
class CoordinatorRound:
    """The coordinator's side of one SecAgg+ round: what to send each site at each stage.

    Each ``on_*`` method takes the replies that came back (node id -> content; a site that failed
    or timed out is simply absent) and returns the next stage's content per site. The coordinator
    only routes: public keys to neighbours, ciphertexts to their addressees, and the lists of
    survivors and dropped sites.
    """

    node_ids: Sequence[int]
    params: SecAggParams
    seed: int = 0
    graph: dict[int, frozenset[int]] = field(init=False)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    sharers: list[int] = field(default_factory=list)
    masked: dict[int, Arrays] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.node_ids) < self.params.reconstruction_threshold:
            raise SecAggError(f"{len(self.node_ids)} sites sampled; strategy.secagg_reconstruction_threshold "
                              f"is {self.params.reconstruction_threshold}: sample more sites or lower it.")
        self.graph = neighbour_graph(self.node_ids, self.params.num_shares, self.seed)

    def setup(self) -> dict[int, dict[str, object]]:
        """Stage 0 content: the settings and each site's neighbours."""
        return {nid: {**params_to_record(self.params), "neighbours": sorted(self.graph[nid])}
                for nid in self.node_ids}

    def on_keys(self, replies: Mapping[int, tuple[bytes, bytes]]) -> dict[int, dict[str, object]]:
        """Stage 1 content: the public keys of each site's neighbours that advertised."""
        self.public_keys = dict(replies)
        out: dict[int, dict[str, object]] = {}
        for nid in self.public_keys:
            ids = sorted(self.graph[nid] & set(self.public_keys))
            out[nid] = {"pk_ids": ids, "pk1": [self.public_keys[i][0] for i in ids],
                        "pk2": [self.public_keys[i][1] for i in ids]}
        return out

    def fit_weight(self, counts: Mapping[int, float]) -> None:
        """Set ``max_weight`` to the largest example count the sites advertised.

        Weights are count / max_weight, and a smaller weight gets fewer quantization levels, so
        the largest count itself is the best precision. The counts are the ones each site also
        reports in the clear with its metrics; the new value travels to the sites at stage 2.
        """
        top = max((float(c) for c in counts.values()), default=0.0)
        self.params = dataclasses.replace(self.params, max_weight=max(top, 1.0))

    def on_shares(self, replies: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[str, object]]:
        """Return stage 2's content: each site's inbox of ciphertexts, and the round's ``max_weight``.

        The inbox holds the source ids and the ciphertexts addressed to the site.
        """
        self.sharers = sorted(replies)
        inbox: dict[int, dict[int, bytes]] = {nid: {} for nid in self.sharers}
        for src, msgs in replies.items():
            for dst, blob in msgs.items():
                if dst in inbox and dst in self.graph[src]:
                    inbox[dst][src] = blob
        return {nid: {"src_ids": sorted(box), "ciphertexts": [box[s] for s in sorted(box)],
                      "max_weight": float(self.params.max_weight)}
                for nid, box in inbox.items()}

    def on_masked(self, replies: Mapping[int, Arrays]) -> dict[int, dict[str, object]]:
        """Stage 3 content: each survivor's surviving and dropped neighbours."""
        self.masked = {nid: vec for nid, vec in replies.items() if nid in self.sharers}
        if self.masked:  # a vector of another layout would break the sum: treat its site as dropped
            layouts = [tuple(a.shape for a in v) for v in self.masked.values()]
            common = max(set(layouts), key=layouts.count)
            self.masked = {nid: v for nid, v in self.masked.items()
                           if tuple(a.shape for a in v) == common
                           and all(np.issubdtype(a.dtype, np.integer) for a in v)}
        alive, gone = set(self.masked), set(self.sharers) - set(self.masked)
        return {nid: {"survivors": sorted(self.graph[nid] & alive), "dropped": sorted(self.graph[nid] & gone)}
                for nid in self.masked}

    def on_unmask(self, replies: Mapping[int, Mapping[int, bytes]]) -> SecureSum:
        """Finish: the weighted mean of the survivors, from their masked sum and the shares."""
        return unmask_sum(self.masked, list(replies.values()), self.public_keys, self.graph, self.sharers,
                          self.params)


def site_stage(stage: str, node_id: int, state: Mapping[str, object] | None, content: Mapping[str, object],
               arrays: Arrays | None = None, num_examples: int = 0) -> tuple[dict[str, object], object]:
    """Answer one stage at a site: the new state to keep and the reply to send.

    ``stage`` is one of :data:`STAGES`; ``node_id`` is the site's own (the SuperNode's);
    ``state`` is what the previous stage returned (None at
    ``advertise_keys``). ``arrays`` and ``num_examples`` (the freshly trained adapter) are needed at
    ``masked_vector`` only.
    """
    c: Mapping[str, Any] = content
    if stage == "advertise_keys":
        site = SiteSecAgg(node_id, params_from_record(c), frozenset(c["neighbours"]))
        reply: object = site.advertise_keys()
    elif state is None:
        raise SecAggError(f"stage {stage!r} came before advertise_keys at this site; the coordinator "
                          "must restart the round.")
    else:
        site = site_from_record(state)
        if site.node_id != node_id:
            raise SecAggError(f"site {node_id}: the kept SecAgg+ state belongs to site {site.node_id}.")
        if stage == "share_keys":
            reply = site.share_keys({i: (a, b) for i, a, b in zip(c["pk_ids"], c["pk1"], c["pk2"])})
        elif stage == "masked_vector":
            if arrays is None:
                raise SecAggError("masked_vector needs the site's trained adapter.")
            if "max_weight" in c:  # the coordinator's fit_weight after stage 0
                site.params = dataclasses.replace(site.params, max_weight=float(c["max_weight"]))
            reply = site.masked_vector(dict(zip(c["src_ids"], c["ciphertexts"])), arrays, num_examples)
        elif stage == "unmask":
            reply = site.unmask(c["survivors"], c["dropped"])
        else:
            raise SecAggError(f"Unknown SecAgg+ stage {stage!r}; expected one of {', '.join(STAGES)}.")
    return site_to_record(site), reply
