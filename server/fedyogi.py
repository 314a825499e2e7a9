"""FedYogi over adapters: like FedAdam, with an additive, sign-controlled second moment.

Flower's :class:`~flwr.serverapp.strategy.FedYogi` does the step; fedmira adds the checks,
robust aggregation and checkpointing of (m, v) with every round (server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from fedmira.server.fedopt import ServerOptimizerState
from fedmira.server.strategy import AdapterAggregation, FedmiraBase


class FedmiraFedYogi(ServerOptimizerState, FedmiraBase, FedYogi, AdapterAggregation):
    """FedYogi with fedmira's checks; ``eta``, ``beta_1``, ``beta_2``, ``tau`` are Flower's."""
