"""FedAvg over adapters: example-weighted mean (or median / trimmed mean) of the LoRA tensors.

Cheapest and simplest; note that averaging A and B separately is not averaging the updates
B·A (see ffa_lora and hetero_svd for exact alternatives). Flower's
:class:`~flwr.serverapp.strategy.FedAvg` samples the sites; fedmira's core checks the replies and
its rule combines them (``server/strategy.py``, ``server/rules.py``).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedmira.server.strategy import FedmiraStrategy


class FedmiraFedAvg(FedmiraStrategy):
    """FedAvg on adapters with fedmira's checks, ledger and robust aggregation."""

    algorithm_cls = FedAvg
