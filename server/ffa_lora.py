"""FFA-LoRA: A frozen at the shared seeded initialisation, only B trained and sent.

With every site's A equal to the global A, an update ``B_k A`` is linear in ``B_k``, so
``mean(B_k) A = mean(B_k A)``: averaging is exact, unlike FedAvg over both factors. Sites
freeze A and reply with the ``lora_B`` tensors only (the message's ``freeze-lora-a`` flag,
``common.site.local_train``), about half
the upload for square layers; the server keeps A exactly as it was and sends the full adapter
down, so a site's A is always the server's.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedmira.common.aggregation import LORA_A, ArrayDict
from fedmira.common.site import round_flags
from fedmira.server.strategy import FedmiraFedAvg


class FedmiraFFALoRA(FedmiraFedAvg):
    """FedAvg over the B factors; the A factors of the global adapter never change."""

    client_flags = round_flags("ffa_lora")  # freeze-lora-a: sites train and send B only

    def expected_shapes(self, arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
        """Replies carry the B tensors only."""
        return {k: tuple(a.shape) for k, a in arrays.items() if not k.endswith(LORA_A)}

    def aggregate_arrays(self, states: list[ArrayDict], weights: list[float]) -> ArrayDict:
        """Mean (or median / trimmed mean) of the B tensors, with the global A unchanged."""
        frozen = {k: v for k, v in self.global_arrays.items() if k.endswith(LORA_A)}
        return dict(sorted({**frozen, **super().aggregate_arrays(states, weights)}.items()))
