"""Heterogeneous LoRA ranks: sites train at their own rank; the server sums updates exactly.

A hospital with less GPU memory trains a rank-4 adapter, a larger one rank 16 (see
``common.site.site_rank``). Replies therefore differ in shape, and averaging factors would not
even be defined. The server instead forms the example-weighted sum of the updates
``(alpha / r_k) B_k A_k`` exactly (``common.aggregation.hetero_aggregate``: QR of the stacked
factors and an SVD of the small core, never the dense matrix) and keeps it as a rank-``lora.r``
adapter in SVD order. Each site is sent its best rank-``r_k`` part (``truncate_adapter``) once
the server has learned its rank from a reply; before that (round 1, or after a resume) it gets
the full adapter and cuts it itself with the same function, so both paths give the same tensors.

Federated evaluation scores the adapter each site would use: its rank-``r_k`` cut. The saved
global adapter (rounds/, final_adapter/) is the full rank-``lora.r`` one.

Cost: a QR of ``d x sum(r_k)`` and ``n x sum(r_k)`` stacked factors and an eigendecomposition
of a core of at most ``sum(r_k)`` squared per layer, so it grows with the summed ranks of the
sites in a round; ``simulations/bench/aggregation.py`` measures it against FedAvg.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedmira.common.aggregation import LORA_A, ArrayDict, adapter_rank, hetero_aggregate, truncate_adapter
from fedmira.common.site import round_flags
from fedmira.server.replies import CheckedReply, Shapes, decode_record
from fedmira.server.rules import AdapterRule, Combiner, RobustMean
from fedmira.server.strategy import FedmiraStrategy


class HeteroSVDRule(AdapterRule):
    """Replies at each site's own rank, summed exactly as updates ``(alpha / r_k) B_k A_k``.

    Parameters
    ----------
    alpha : float
        ``lora.alpha``: a rank-r adapter applies ``(alpha / r) B A``.
    max_rank : int
        ``lora.r``, the rank of the global adapter and the highest a site may use.
    seed : int
        Seed of the randomized parts of the decomposition (combined with the round).
    """

    def __init__(self, *, alpha: float, max_rank: int, seed: int = 0) -> None:
        super().__init__(combiner=RobustMean())  # unused: mixed ranks are summed in combine()
        self.alpha, self.max_rank, self.seed = alpha, max_rank, seed
        #: node id -> the rank it trains at, learned from its first accepted reply
        self.node_ranks: dict[int, int] = {}

    @staticmethod
    def _reply_rank(arrays: ArrayRecord, expected: Shapes) -> int | None:
        """Return the reply's rank, read from its first expected A tensor (None if missing)."""
        a_key = next((k for k in expected if k.endswith(LORA_A)), None)
        return int(arrays[a_key].shape[0]) if a_key is not None and a_key in arrays else None

    def expected_for(self, arrays: ArrayRecord, expected: Shapes) -> Shapes:
        """Return the global adapter's keys at the reply's own rank."""
        rank = self._reply_rank(arrays, expected)
        if rank is None:
            return expected  # the key check then names what is missing
        return {k: (rank, s[1]) if k.endswith(LORA_A) else (s[0], rank) for k, s in expected.items()}

    def refuse(self, arrays: ArrayRecord, expected: Shapes) -> str | None:
        """Return why the reply's rank is out of ``[1, max_rank]``, or None."""
        rank = self._reply_rank(arrays, expected)
        if rank is not None and not 1 <= rank <= self.max_rank:
            return f"LoRA rank {rank} is not in [1, lora.r={self.max_rank}] (the global rank)"
        return None

    def accept(self, reply: CheckedReply) -> None:
        """From now on this node is sent adapters at its own rank."""
        self.node_ranks[reply.node] = adapter_rank(reply.state)

    def reference_for(self, state: ArrayDict, global_arrays: ArrayDict) -> ArrayDict:
        """Return the global adapter as the site received it: cut to the site's rank."""
        if not global_arrays:
            return {k: np.zeros_like(v) for k, v in state.items()}
        return truncate_adapter(global_arrays, adapter_rank(state))

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the best rank-``max_rank`` approximation of the weighted sum of the updates."""
        return hetero_aggregate(states, weights, alpha=self.alpha, rank=self.max_rank,
                                seed=self.seed * 100003 + g)

    def personalize(self, messages: list[Message]) -> list[Message]:
        """Send each node whose rank is known its rank-``r_k`` cut of the global adapter."""
        if not messages or not any(self.node_ranks.get(m.metadata.dst_node_id, self.max_rank) < self.max_rank
                                   for m in messages):
            return messages
        (array_key,) = messages[0].content.array_records  # Flower's FedAvg sends one of each
        (config_key,) = messages[0].content.config_records
        full = decode_record(messages[0].content.array_records[array_key])
        cuts: dict[int, ArrayRecord] = {}
        out = []
        for m in messages:
            rank = self.node_ranks.get(m.metadata.dst_node_id, self.max_rank)
            if rank >= self.max_rank:
                out.append(m)
                continue
            if rank not in cuts:
                cuts[rank] = ArrayRecord({k: Array(v) for k, v in truncate_adapter(full, rank).items()})
            content = RecordDict({array_key: cuts[rank], config_key: m.content[config_key]})
            out.append(Message(content=content, message_type=m.metadata.message_type,
                               dst_node_id=m.metadata.dst_node_id))
        return out


class FedmiraHeteroSVD(FedmiraStrategy):
    """Exact aggregation of mixed-rank LoRA updates.

    Parameters
    ----------
    alpha : float
        ``lora.alpha``: a rank-r adapter applies ``(alpha / r) B A``.
    max_rank : int
        ``lora.r``, the rank of the global adapter and the highest a site may use.
    **kwargs
        :class:`~fedmira.server.strategy.FedmiraStrategy`'s and Flower's FedAvg's arguments.
    """

    algorithm_cls = FedAvg
    client_flags = round_flags("hetero_svd")  # own-rank: each site trains at its own rank

    def __init__(self, *, alpha: float, max_rank: int, **kwargs: Any) -> None:
        self.alpha, self.max_rank = alpha, max_rank
        super().__init__(**kwargs)

    def rule_for(self, combiner: Combiner) -> AdapterRule:
        """Return the mixed-rank rule (it refuses site-level DP: updates of different ranks)."""
        if self.site_dp is not None:
            raise ValueError("privacy.site_level does not work with strategy=hetero_svd (sites send "
                             "adapters of different ranks); use another strategy")
        return HeteroSVDRule(alpha=self.alpha, max_rank=self.max_rank, seed=self.seed)
