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

from fedmira.common.aggregation import LORA_A, ArrayDict, adapter_rank, hetero_aggregate, truncate_adapter
from fedmira.common.site import round_flags
from fedmira.server.strategy import FedmiraFedAvg, decode_record


class FedmiraHeteroSVD(FedmiraFedAvg):
    """Exact aggregation of mixed-rank LoRA updates.

    Parameters
    ----------
    alpha : float
        ``lora.alpha``: a rank-r adapter applies ``(alpha / r) B A``.
    max_rank : int
        ``lora.r``, the rank of the global adapter and the highest a site may use.
    """

    client_flags = round_flags("hetero_svd")  # own-rank: each site trains at its own rank

    def __init__(self, *, alpha: float, max_rank: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.max_rank = max_rank
        self.node_ranks: dict[int, int] = {}

    @staticmethod
    def _reply_rank(arrays: ArrayRecord, expected: dict[str, tuple[int, ...]]) -> int | None:
        """The reply's rank, read from its first expected A tensor (None if that is missing)."""
        a_key = next((k for k in expected if k.endswith(LORA_A)), None)
        return int(arrays[a_key].shape[0]) if a_key is not None and a_key in arrays else None

    def expected_for(self, msg: Message, arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
        """The global adapter's keys at the reply's own rank."""
        rank = self._reply_rank(arrays, self.expected)
        if rank is None:
            return self.expected  # the key check then names what is missing
        return {k: (rank, s[1]) if k.endswith(LORA_A) else (s[0], rank) for k, s in self.expected.items()}

    def _adapter_ok(self, g: int, msg: Message) -> bool:
        records = msg.content.array_records
        rank = self._reply_rank(next(iter(records.values())), self.expected) if len(records) == 1 else None
        if rank is not None and not 1 <= rank <= self.max_rank:
            self._reject(g, msg, f"LoRA rank {rank} is not in [1, lora.r={self.max_rank}] (the global rank)")
            return False
        ok = super()._adapter_ok(g, msg)
        if ok:  # from now on this node is sent adapters at its own rank
            self.node_ranks[msg.metadata.src_node_id] = adapter_rank(self.reply_state(msg))
        return ok

    def reference_for(self, state: ArrayDict) -> ArrayDict:
        """The global adapter as the site received it: cut to the site's rank."""
        if not self.global_arrays:
            return {k: np.zeros_like(v) for k, v in state.items()}
        return truncate_adapter(self.global_arrays, adapter_rank(state))

    def aggregate_arrays(self, states: list[ArrayDict], weights: list[float]) -> ArrayDict:
        """Best rank-``max_rank`` approximation of the weighted sum of the sites' updates."""
        return hetero_aggregate(states, weights, alpha=self.alpha, rank=self.max_rank,
                                seed=self.seed * 100003 + self.current_round)

    def personalize(self, messages: list[Message]) -> list[Message]:
        """Send each node whose rank is known its rank-``r_k`` cut of the global adapter."""
        if not messages or not any(self.node_ranks.get(m.metadata.dst_node_id, self.max_rank) < self.max_rank
                                   for m in messages):
            return messages
        full = decode_record(messages[0].content[self.arrayrecord_key])
        cuts: dict[int, ArrayRecord] = {}
        out = []
        for m in messages:
            rank = self.node_ranks.get(m.metadata.dst_node_id, self.max_rank)
            if rank >= self.max_rank:
                out.append(m)
                continue
            if rank not in cuts:
                cuts[rank] = ArrayRecord({k: Array(v) for k, v in truncate_adapter(full, rank).items()})
            content = RecordDict({self.arrayrecord_key: cuts[rank],
                                  self.configrecord_key: m.content[self.configrecord_key]})
            out.append(Message(content=content, message_type=m.metadata.message_type,
                               dst_node_id=m.metadata.dst_node_id))
        return out

