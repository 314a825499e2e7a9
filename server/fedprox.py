"""FedProx over adapters: FedAvg plus a proximal term at the sites.

Flower's :class:`~flwr.serverapp.strategy.FedProx` puts ``proximal-mu`` into every training
message's config; each site adds ``(mu / 2) * ||w - w_global||^2`` over its adapter to the loss
(``common.engine.train_steps(proximal=...)``), which keeps hospitals with skewed data close to
the global adapter within a round. Aggregation is fedmira's (mean / median / trimmed mean).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fedmira.server.strategy import FedmiraStrategy


class FedmiraFedProx(FedmiraStrategy):
    """FedProx with fedmira's checks; ``proximal_mu`` goes to Flower's FedProx."""

    algorithm_cls = FedProx
