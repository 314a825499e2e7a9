"""Aggregation rules: what a reply must hold and how the checked replies become one adapter.

A strategy *has* one rule (``FedmiraStrategy.rule``). :class:`AdapterRule` is the rule of
FedAvg, FedProx and the server optimizers: every site sends the whole adapter at the global
shapes and a combiner merges them, by default :class:`RobustMean` (``mean | median |
trimmed_mean`` of ``common.aggregation``) or, with site-level DP, ``server.site_dp.SiteLevelDP``
in its place. FFA-LoRA (``server/ffa_lora.py``) and heterogeneous ranks
(``server/hetero_svd.py``) bring their own rules.

Replies are combined as float32 (16-bit transport decoded first): Flower's own averaging would
read bfloat16 bit patterns as integers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, Message

from fedmira.common.aggregation import ArrayDict, combine
from fedmira.server.replies import CheckedReply, Shapes, shapes_of


class Combiner(Protocol):
    """Merges same-shaped adapters into one."""

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the combination of ``states`` (weights by example count) in global round ``g``."""
        ...


class RobustMean:
    """Example-weighted mean, coordinate-wise median or trimmed mean (``strategy.aggregation``).

    Parameters
    ----------
    aggregation : str
        ``mean | median | trimmed_mean`` (median and trimmed mean are unweighted).
    trim_fraction : float
        Fraction cut from each end per coordinate for ``trimmed_mean``.
    """

    def __init__(self, aggregation: str = "mean", trim_fraction: float = 0.1) -> None:
        self.aggregation, self.trim_fraction = aggregation, trim_fraction

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the configured combination of ``states`` (the global adapter is not needed)."""
        return combine(states, weights, self.aggregation, self.trim_fraction)


class AdapterRule:
    """Every site sends the whole adapter at the global shapes; ``combiner`` merges them.

    Parameters
    ----------
    combiner : Combiner
        How same-shaped adapters are merged (:class:`RobustMean`, or site-level DP).
    """

    def __init__(self, combiner: Combiner) -> None:
        self.combiner = combiner

    def expected_shapes(self, arrays: ArrayRecord) -> Shapes:
        """Return the keys and shapes a reply must have, given the global adapter sent."""
        return shapes_of(arrays)

    def expected_for(self, arrays: ArrayRecord, expected: Shapes) -> Shapes:
        """Return the keys and shapes this particular reply must have."""
        return expected

    def refuse(self, arrays: ArrayRecord, expected: Shapes) -> str | None:
        """Return why a reply is unusable for this rule before its shapes are compared, or None."""
        return None

    def accept(self, reply: CheckedReply) -> None:
        """Learn from a reply that passed every check (nothing to learn here)."""

    def reference_for(self, state: ArrayDict, global_arrays: ArrayDict) -> ArrayDict:
        """Return what the site started from, to measure its update (zero if unknown)."""
        return {k: global_arrays.get(k, np.zeros_like(v)) for k, v in state.items()}

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the merged adapter of round ``g``."""
        return self.combiner.combine(states, weights, global_arrays, g)

    def personalize(self, messages: list[Message]) -> list[Message]:
        """Return the messages as each site should get them (the same payload for all here)."""
        return messages
