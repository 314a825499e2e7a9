"""FedAdagrad over adapters: the mean delta scaled by the accumulated squared deltas.

Flower's :class:`~flwr.serverapp.strategy.FedAdagrad` does the step (no momentum: its beta_1 is
fixed at 0); fedmira adds the checks, robust aggregation and checkpointing of (m, v) with every
round (server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad

from fedmira.server.fedopt import ServerOptimizerState
from fedmira.server.strategy import AdapterAggregation, FedmiraBase


class FedmiraFedAdagrad(ServerOptimizerState, FedmiraBase, FedAdagrad, AdapterAggregation):
    """FedAdagrad with fedmira's checks; ``eta`` and ``tau`` are Flower's."""
