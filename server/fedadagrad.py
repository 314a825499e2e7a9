"""FedAdagrad over adapters: the mean delta scaled by the accumulated squared deltas.

Flower's :class:`~flwr.serverapp.strategy.FedAdagrad` does the step (no momentum: its beta_1 is
fixed at 0) on the checked replies' robust mean; its (m, v) are checkpointed with every round
(server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad

from fedmira.server.strategy import FedmiraStrategy


class FedmiraFedAdagrad(FedmiraStrategy):
    """FedAdagrad with fedmira's checks; ``eta`` and ``tau`` go to Flower's FedAdagrad."""

    algorithm_cls = FedAdagrad
