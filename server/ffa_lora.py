"""FFA-LoRA: A frozen at the shared seeded initialisation, only B trained and sent.

With every site's A equal to the global A, an update ``B_k A`` is linear in ``B_k``, so
``mean(B_k) A = mean(B_k A)``: averaging is exact, unlike FedAvg over both factors. Sites
freeze A and reply with the ``lora_B`` tensors only (the message's ``freeze-lora-a`` flag,
``common.site.local_train``), about half the upload for square layers; the server keeps A
exactly as it was and sends the full adapter down, so a site's A is always the server's.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg

from fedmira.common.aggregation import LORA_A, ArrayDict
from fedmira.common.site import round_flags
from fedmira.server.replies import Shapes
from fedmira.server.rules import AdapterRule, Combiner
from fedmira.server.strategy import FedmiraStrategy


class FFALoRARule(AdapterRule):
    """Replies carry the B tensors only; the combiner merges them and A stays the global A."""

    def expected_shapes(self, arrays: ArrayRecord) -> Shapes:
        """Return the B tensors' keys and shapes."""
        return {k: tuple(a.shape) for k, a in arrays.items() if not k.endswith(LORA_A)}

    def combine(self, states: list[ArrayDict], weights: list[float], global_arrays: ArrayDict,
                g: int) -> ArrayDict:
        """Return the merged B tensors with the global A tensors unchanged, bit for bit."""
        frozen = {k: v for k, v in global_arrays.items() if k.endswith(LORA_A)}
        merged = self.combiner.combine(states, weights, global_arrays, g)
        return dict(sorted({**frozen, **merged}.items()))


class FedmiraFFALoRA(FedmiraStrategy):
    """FedAvg over the B factors; the A factors of the global adapter never change."""

    algorithm_cls = FedAvg
    client_flags = round_flags("ffa_lora")  # freeze-lora-a: sites train and send B only

    def rule_for(self, combiner: Combiner) -> AdapterRule:
        """Return the FFA-LoRA rule around ``combiner``."""
        return FFALoRARule(combiner)
