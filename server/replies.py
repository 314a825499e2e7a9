"""Reading and checking the sites' replies: who sent one, and whether its adapter is usable.

Plain functions on Flower ``Message`` objects, no strategy state: the strategy core
(``server/strategy.py``) calls them and records what they reject in its ledger. A reply that
passes comes back as a :class:`CheckedReply` holding its adapter decoded to float32 once, so
nothing downstream decodes it again or caches it by object id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID, SType

from fedmira.common.aggregation import ArrayDict, norm_outliers, update_norms
from fedmira.common.transport import decode_array, npy_values, payload_bytes

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class CheckedReply:
    """A training reply whose structure and values passed :func:`check_reply`.

    Attributes
    ----------
    msg : Message
        The reply as it arrived.
    state : dict of str to ndarray
        Its adapter tensors as float32 NumPy arrays (16-bit transport decoded).
    weight : float
        Its ``num-examples`` (or whichever key the strategy weights by); 0 for a site that
        trained no step because its privacy budget is spent.
    """

    msg: Message
    state: ArrayDict
    weight: float

    @property
    def node(self) -> int:
        """The node that sent the reply."""
        return int(self.msg.metadata.src_node_id)

    @property
    def site(self) -> str:
        """The site id the reply reports."""
        return site_of(self.msg)


def site_of(msg: Message) -> str:
    """Return the site id a reply reports, else ``node-N`` for its sender."""
    site = msg.content.config_records.get("site")
    return str(site["site-id"]) if site is not None else f"node-{msg.metadata.src_node_id}"


def reason_of(msg: Message) -> str:
    """Return an error reply's reason, shortened (Flower's Error may carry none)."""
    reason = msg.error.reason
    return reason[:200] if reason else f"error code {msg.error.code}, no reason given"


def metric(msg: Message, key: str) -> float | None:
    """Return a numeric metric of the reply, or None when it has none."""
    rec = next(iter(msg.content.metric_records.values()), None)
    value = rec.get(key) if rec is not None else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def num_examples(msg: Message, key: str) -> float:
    """Return the reply's weight (``key`` of its MetricRecord), 0 when it has none."""
    value = metric(msg, key)
    return value if value is not None else 0.0


def from_superlink(msg: Message) -> bool:
    """Tell whether an error reply was written by the SuperLink itself.

    A node that stopped sending heartbeats or a message that expired comes back as an error
    reply whose source is Flower's ``SUPERLINK_NODE_ID``, not the node it is about.
    """
    return msg.has_error() and msg.metadata.src_node_id == SUPERLINK_NODE_ID


def array_values(arr: Array) -> np.ndarray:
    """Return an Array's values: from its ``.npy`` bytes when possible, else ``Array.numpy()``."""
    if arr.stype == SType.NUMPY:
        values = npy_values(arr.data, arr.dtype, tuple(arr.shape))
        if values is not None:
            return values
    return arr.numpy()


def decode_record(record: ArrayRecord) -> ArrayDict:
    """Return every tensor of an ArrayRecord as float32 NumPy arrays (16-bit transport decoded)."""
    return {k: decode_array(array_values(a)) for k, a in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Return the bytes of an ArrayRecord's tensors on the wire, at the dtype they travel in."""
    return sum(payload_bytes(tuple(a.shape), a.dtype) for a in record.values())


def shapes_of(record: ArrayRecord) -> Shapes:
    """Return the keys and shapes of an ArrayRecord's tensors."""
    return {k: tuple(a.shape) for k, a in record.items()}


def check_structure(msg: Message, weighted_by_key: str) -> str | None:
    """Return why a reply's records are unusable (one MetricRecord, one ArrayRecord), or None."""
    metrics = msg.content.metric_records
    if len(metrics) != 1 or weighted_by_key not in next(iter(metrics.values())):
        return f"expected one MetricRecord with `{weighted_by_key}`"
    records = msg.content.array_records
    if len(records) != 1:
        return f"expected one ArrayRecord, got {len(records)}"
    return None


def reply_arrays(msg: Message) -> ArrayRecord:
    """Return the reply's one ArrayRecord (after :func:`check_structure`)."""
    return next(iter(msg.content.array_records.values()))


def check_reply(msg: Message, expected: Shapes, weighted_by_key: str) -> CheckedReply | str:
    """Check a reply whose records are well formed against the adapter shapes it must have.

    Parameters
    ----------
    msg : Message
        A reply without error that passed :func:`check_structure`.
    expected : dict of str to tuple of int
        The keys and shapes this reply must hold.
    weighted_by_key : str
        The metric the strategy weights by (``num-examples``).

    Returns
    -------
    CheckedReply or str
        The reply with its decoded adapter, or why it is rejected (no report text: keys,
        shapes and dtypes only).
    """
    got = shapes_of(reply_arrays(msg))
    if got != expected:
        diff = sorted(set(got) ^ set(expected))[:2] or [k for k in got if got[k] != expected.get(k)][:2]
        return f"adapter keys/shapes differ from the global adapter (e.g. {diff})"
    try:
        state = decode_record(reply_arrays(msg))
    except (ValueError, TypeError) as exc:  # an undecodable dtype or a corrupt payload
        return f"adapter tensor not readable: {exc}"
    for key, arr in state.items():
        if not np.isfinite(arr).all():
            return f"adapter tensor {key} holds NaN/Inf"
    return CheckedReply(msg=msg, state=state, weight=num_examples(msg, weighted_by_key))


def norm_outliers_of(
    replies: list[CheckedReply], references: list[ArrayDict], norm_factor: float,
) -> tuple[list[float], dict[int, str]]:
    """Find the replies whose update norm is far beyond the others'.

    Sites that did different work (``train.epochs``: steps in proportion to data; warm-up) move
    different distances; AdamW moves about lr per step, so when every reply says how much lr
    it spent (``lr-sum``), norms are compared per unit of it.

    Parameters
    ----------
    replies : list of CheckedReply
        The replies to compare (at least two).
    references : list of dict
        What each site started from, aligned with ``replies``.
    norm_factor : float
        A reply is an outlier when its score exceeds this factor x the others' median.

    Returns
    -------
    norms : list of float
        Each reply's update norm, aligned with ``replies``.
    outliers : dict of int to str
        Index of each outlier -> why it is rejected.
    """
    norms = update_norms([r.state for r in replies], references)
    work = [metric(r.msg, "lr-sum") for r in replies]
    spent = [w for w in work if w is not None and w > 0]
    per_lr = len(spent) == len(work)
    scores = [n / w for n, w in zip(norms, spent)] if per_lr else norms
    what = "update norm per unit of learning rate" if per_lr else "update norm"
    outliers = {}
    for i, outlier in enumerate(norm_outliers(scores, norm_factor)):
        if outlier:
            others = float(np.median(scores[:i] + scores[i + 1:]))
            outliers[i] = (f"{what} {scores[i]:.4g} > strategy.norm_factor={norm_factor:g} x the "
                           f"others' median {others:.4g}")
    return norms, outliers
