"""Site-level differential privacy as a combiner: clip each site's update, average, add noise.

With ``privacy.site_level`` the strategy's rule is given :class:`SiteLevelDP` in place of the
robust mean (``server/rules.py``): each site's update around the global adapter is clipped to
``privacy.site_clip``, the clipped updates are averaged *unweighted* and Gaussian noise of
``noise_multiplier x clip / n`` is added (``common.privacy.site_level_aggregate``). The
:class:`~fedmira.common.privacy.SiteLevelLedger` it shares with the strategy accounts epsilon
over rounds; the strategy records each round's sampling rate in it.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedmira.common.aggregation import ArrayDict
from fedmira.common.privacy import SiteLevelLedger, site_level_aggregate


class SiteLevelDP:
    """The clipped, noised, unweighted mean of the sites' updates.

    Parameters
    ----------
    ledger : SiteLevelLedger
        Clip norm and noise multiplier, and the accountant of the run.
    seed : int
        Seed of the server's noise (combined with the round) for reproducible research runs.
    secure_mode : bool
        Draw the noise from OS entropy instead of the run seed (``privacy.secure_mode``).
    """

    def __init__(self, ledger: SiteLevelLedger, *, seed: int = 0, secure_mode: bool = False) -> None:
        self.ledger, self.seed, self.secure_mode = ledger, seed, secure_mode

    def rng(self, g: int) -> np.random.Generator:
        """Return the noise generator of global round ``g``."""
        if self.secure_mode:
            return np.random.default_rng(secrets.randbits(128))
        return np.random.default_rng([self.seed, g, 7])

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the DP mean of ``states``' updates around the global adapter (weights unused)."""
        reference = {k: global_arrays[k] for k in states[0]}
        out, _ = site_level_aggregate(reference, states, clip=self.ledger.clip,
                                      noise_multiplier=self.ledger.noise_multiplier, rng=self.rng(g))
        return out
