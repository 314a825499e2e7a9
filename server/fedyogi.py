"""FedYogi over adapters: like FedAdam, with an additive, sign-controlled second moment.

Flower's :class:`~flwr.serverapp.strategy.FedYogi` does the step on the checked replies' robust
mean; its (m, v) are checkpointed with every round (server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from fedmira.server.strategy import FedmiraStrategy


class FedmiraFedYogi(FedmiraStrategy):
    """FedYogi with fedmira's checks; ``eta``, ``beta_1``, ``beta_2``, ``tau`` go to Flower's FedYogi."""

    algorithm_cls = FedYogi
