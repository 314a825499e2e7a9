"""Checkpointing Flower's server optimizers (FedAdam, FedYogi, FedAdagrad) with every round.

Flower's :class:`~flwr.serverapp.strategy.FedOpt` family keeps its state in memory: the first
and second moments ``m_t`` / ``v_t`` (dicts of arrays keyed like the adapter) and, implicitly,
the step count ``t``, which FedAdam's bias correction reads from the round number it is given.
:func:`fedopt_state` exposes that state so the ServerApp writes it next to each round's adapter
(``rounds/round_000N/strategy_state.safetensors``) and :func:`load_fedopt_state` restores it on
resume; the optimizer receives fedmira's *global* round (``FedmiraStrategy.aggregate_train``),
so the bias correction continues where it stopped instead of restarting at 1.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy.fedopt import FedOpt

from fedmira.common.aggregation import ArrayDict

MOMENTS = ("m_t", "v_t")


def fedopt_state(optimizer: FedOpt, owner: str, t: int) -> tuple[ArrayDict, dict[str, str]] | None:
    """Return the optimizer's moments as tensors plus metadata, or None before its first step.

    Parameters
    ----------
    optimizer : FedOpt
        Flower's server optimizer.
    owner : str
        The strategy class that owns it, recorded so a resume with another strategy fails.
    t : int
        The global round of the last step.

    Returns
    -------
    tuple or None
        ``({"m_t/<key>": array, "v_t/<key>": array}, {"strategy": owner, "t": str(t)})``.
    """
    tensors: ArrayDict = {}
    for name in MOMENTS:
        for key, value in (getattr(optimizer, name) or {}).items():
            tensors[f"{name}/{key}"] = np.ascontiguousarray(value)
    if not tensors:
        return None
    return tensors, {"strategy": owner, "t": str(t)}


def load_fedopt_state(optimizer: FedOpt, tensors: ArrayDict, metadata: dict[str, str], owner: str) -> None:
    """Restore the moments saved by :func:`fedopt_state` into ``optimizer``.

    Raises
    ------
    ValueError
        When the state was written by another strategy class than ``owner``.
    """
    if metadata.get("strategy") != owner:
        raise ValueError(f"strategy state was written by {metadata.get('strategy')}, "
                         f"not {owner}; resume with the recorded strategy")
    for name in MOMENTS:
        prefix = f"{name}/"
        moment = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        setattr(optimizer, name, moment or None)
