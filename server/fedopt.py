"""What fedmira adds to Flower's server optimizers (FedAdam, FedYogi, FedAdagrad): checkpointing.

Flower's :class:`~flwr.serverapp.strategy.FedOpt` family keeps its state in memory: the first
and second moments ``m_t`` / ``v_t`` (dicts of arrays keyed like the adapter) and, implicitly,
the step count ``t``, which FedAdam's bias correction reads from the round number it is given.
:class:`ServerOptimizerState` exposes that state so the ServerApp writes it next to each round's
adapter (``rounds/round_000N/strategy_state.safetensors``) and restores it on resume; the layers
below receive fedmira's *global* round (``FedmiraBase.aggregate_train``), so the bias correction
continues where it stopped instead of restarting at 1.
"""

from __future__ import annotations

import numpy as np

from fedmira.common.aggregation import ArrayDict

MOMENTS = ("m_t", "v_t")


class ServerOptimizerState:
    """Mixin for FedOpt-based strategies: (m_t, v_t, t) as tensors + metadata, and back."""

    m_t: dict[str, np.ndarray] | None
    v_t: dict[str, np.ndarray] | None
    current_round: int

    def strategy_state(self) -> tuple[ArrayDict, dict[str, str]] | None:
        """``{"m_t/<key>": array, "v_t/<key>": array}`` and ``{"strategy", "t"}``; None before round 1."""
        tensors: ArrayDict = {}
        for name in MOMENTS:
            for key, value in (getattr(self, name) or {}).items():
                tensors[f"{name}/{key}"] = np.ascontiguousarray(value)
        if not tensors:
            return None
        return tensors, {"strategy": type(self).__name__, "t": str(self.current_round)}

    def load_strategy_state(self, tensors: ArrayDict, metadata: dict[str, str]) -> None:
        """Restore the moments saved by :meth:`strategy_state`.

        Raises
        ------
        ValueError
            When the state was written by another strategy class.
        """
        if metadata.get("strategy") != type(self).__name__:
            raise ValueError(f"strategy state was written by {metadata.get('strategy')}, "
                             f"not {type(self).__name__}; resume with the recorded strategy")
        for name in MOMENTS:
            prefix = f"{name}/"
            moment = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            setattr(self, name, moment or None)
