"""What crosses the wire: adapter tensors at a transport precision, their size, the byte budget.

Sites may send their adapter in 16 bits (``strategy.transport_dtype``) to halve the upload; the
server decodes every reply to float32 before aggregating, so the aggregate is computed in full
precision whatever the sites sent.

Flower's ``Array`` serialises NumPy arrays (``np.save``), and a torch tensor is converted with
``tensor.numpy()``, which fails for ``torch.bfloat16``: NumPy has no bfloat16. float16 travels as
NumPy float16. bfloat16 travels as its raw 16-bit pattern in a ``uint16`` array (the upper half
of the float32 bit pattern, rounded to nearest even by torch), which the server widens back
exactly: ``(uint32(bits) << 16).view(float32)``. A ``uint16`` adapter tensor therefore means
bfloat16; no other integer dtype is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedmira.common.config import TRANSPORT_DTYPES

BYTES_PER_MB = 1_000_000  # MB as in "1.8 MB per adapter": decimal, like network traffic
BUDGET_WARN_SHARE = 0.8

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_DECODABLE = ("float32", "float16", "float64", "uint16")


def encode_tensor(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """Convert ``tensor`` to a CPU NumPy array at the transport ``dtype`` (bfloat16 as uint16 bits)."""
    t = tensor.detach().to("cpu")
    if dtype == "float32":
        return t.to(torch.float32).contiguous().numpy()
    if dtype == "float16":
        return t.to(torch.float16).contiguous().numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"unknown transport dtype {dtype!r}; expected one of {', '.join(TRANSPORT_DTYPES)}")


def encode_state(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    """Every tensor of an adapter state encoded for transport (see :func:`encode_tensor`)."""
    return {k: encode_tensor(v, dtype) for k, v in state.items()}


def decode_array(array: np.ndarray) -> np.ndarray:
    """float32 values of a received tensor: float16/float64 are cast, uint16 is bfloat16 bits.

    Raises
    ------
    ValueError
        For any other dtype (the reply is then rejected, naming the tensor).
    """
    if array.dtype == np.float32:
        return array
    if array.dtype in (np.float16, np.float64):
        return array.astype(np.float32)
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"dtype {array.dtype} is not an adapter transport dtype ({', '.join(_DECODABLE)})")


def npy_values(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """View the values of a C-ordered ``.npy`` blob of known dtype and shape (read-only).

    Flower's ``Array`` stores ``np.save`` output; ``np.load`` parses every header with
    ``ast.literal_eval`` (~0.2 ms a tensor: a second for 42 sites x 120 tensors). With dtype and
    shape already known, the values are simply the last ``nbytes`` of the blob. Returns None
    (use ``np.load``) unless the header says exactly that: the magic, this dtype, C order.
    """
    dt = np.dtype(dtype)
    count = math.prod(shape)
    offset = len(data) - count * dt.itemsize
    header = data[:offset] if offset >= 10 else b""
    if not (header.startswith(b"\x93NUMPY") and f"'descr': '{dt.str}'".encode() in header
            and b"'fortran_order': False" in header):
        return None
    return np.frombuffer(data, dtype=dt, count=count, offset=offset).reshape(shape)


def payload_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor's values on the wire (the few bytes of NumPy header not counted)."""
    itemsize = _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize
    return math.prod(shape) * itemsize


def state_payload_bytes(state: Mapping[str, Any], dtype: str) -> int:
    """Bytes an adapter state takes on the wire at transport ``dtype``."""
    return sum(payload_bytes(tuple(v.shape), dtype) for v in state.values())


def budget_status(used_bytes: int, budget_mb: float) -> str:
    """``ok``, ``warn`` (at least 80% used) or ``exceeded``; ``ok`` when there is no budget."""
    if budget_mb <= 0:
        return "ok"
    budget = budget_mb * BYTES_PER_MB
    if used_bytes > budget:
        return "exceeded"
    return "warn" if used_bytes >= BUDGET_WARN_SHARE * budget else "ok"
