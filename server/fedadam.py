"""FedAdam over adapters: the server takes an Adam step on the mean adapter delta.

Flower's :class:`~flwr.serverapp.strategy.FedAdam` does the step (eta = ``strategy.server_lr``,
``beta_1``, ``beta_2``, ``tau``) on the checked replies' robust mean; its (m, v) are
checkpointed with every round (server/fedopt.py).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from fedmira.server.strategy import FedmiraStrategy


class FedmiraFedAdam(FedmiraStrategy):
    """FedAdam with fedmira's checks; ``eta``, ``beta_1``, ``beta_2``, ``tau`` go to Flower's FedAdam."""

    algorithm_cls = FedAdam
