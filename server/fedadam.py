"""FedAdam over adapters: the server takes an Adam step on the mean adapter delta.

Flower's :class:`~flwr.serverapp.strategy.FedAdam` does the step (eta = ``strategy.server_lr``,
``beta_1``, ``beta_2``, ``tau``); fedmira adds the checks, robust aggregation of the delta's
mean, and checkpointing of (m, v, t) with every round (server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedmira.server.fedopt import ServerOptimizerState
from fedmira.server.strategy import AdapterAggregation, FedmiraBase


class FedmiraFedAdam(ServerOptimizerState, FedmiraBase, FedAdam, AdapterAggregation):
    """FedAdam with fedmira's checks; ``eta``, ``beta_1``, ``beta_2``, ``tau`` are Flower's."""
