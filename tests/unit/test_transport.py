"""common.transport: 16-bit adapters on the wire, exact decoding, payload sizes, the byte budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array

from fedmira.common.transport import (
    budget_status,
    decode_array,
    encode_state,
    encode_tensor,
    npy_values,
    payload_bytes,
    state_payload_bytes,
)


def test_flower_cannot_serialise_a_bfloat16_tensor_so_it_travels_as_bits() -> None:
    """Why bfloat16 is encoded by hand: Array(torch tensor) goes through numpy, which lacks bf16."""
    t = torch.randn(3, 4)
    with pytest.raises(TypeError):
        Array(t.to(torch.bfloat16))
    encoded = encode_tensor(t, "bfloat16")
    assert encoded.dtype == np.uint16 and encoded.shape == (3, 4)
    received = Array(encoded).numpy()  # through Flower's own serialisation
    np.testing.assert_array_equal(decode_array(received), t.to(torch.bfloat16).float().numpy())


def test_bfloat16_and_float16_round_trips() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625, 1e-3, 65504.0, 1e20])
    bf = decode_array(encode_tensor(t, "bfloat16"))
    assert bf.dtype == np.float32
    np.testing.assert_array_equal(bf[:3], [1.0, -2.5, 3.140625])  # representable: exact
    np.testing.assert_allclose(bf, t.numpy(), rtol=2**-8)  # bf16 keeps 8 bits of mantissa
    half = decode_array(encode_tensor(t[:5], "float16"))
    np.testing.assert_allclose(half, t[:5].numpy(), rtol=2**-11)
    same = encode_tensor(t, "float32")
    assert same.dtype == np.float32 and decode_array(same) is same


def test_decode_rejects_other_dtypes_and_encode_other_names() -> None:
    with pytest.raises(ValueError, match="int32"):
        decode_array(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="transport dtype"):
        encode_tensor(torch.zeros(2), "int8")
    assert decode_array(np.ones(2, np.float64)).dtype == np.float32


def test_payload_sizes_halve_in_16_bits() -> None:
    state = {"a": torch.zeros(8, 576), "b": torch.zeros(576, 8)}
    assert state_payload_bytes(state, "float32") == 2 * 8 * 576 * 4
    assert state_payload_bytes(state, "bfloat16") == state_payload_bytes(state, "float16") == 2 * 8 * 576 * 2
    encoded = encode_state(state, "bfloat16")
    assert sum(v.nbytes for v in encoded.values()) == state_payload_bytes(state, "bfloat16")
    assert payload_bytes((3, 2), "uint16") == 12 and payload_bytes((3,), "float64") == 24


def test_budget_status_thresholds() -> None:
    assert budget_status(10**9, 0) == "ok"  # no budget
    assert budget_status(799_999, 1.0) == "ok"
    assert budget_status(800_000, 1.0) == "warn"
    assert budget_status(1_000_000, 1.0) == "warn"  # at the budget: not yet over it
    assert budget_status(1_000_001, 1.0) == "exceeded"


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.arange(5, dtype=np.float16),
    np.arange(6, dtype=np.uint16).reshape(2, 3),
    np.array(2.5, dtype=np.float32),  # 0-d
    np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian: read with its own byte order
])
def test_npy_values_reads_flowers_array_bytes_like_np_load(array: np.ndarray) -> None:
    arr = Array(array)
    got = npy_values(arr.data, arr.dtype, tuple(arr.shape))
    assert got is not None and got.dtype == arr.numpy().dtype
    np.testing.assert_array_equal(got, arr.numpy())


def test_npy_values_declines_what_it_cannot_read_safely() -> None:
    fortran = Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    assert npy_values(fortran.data, fortran.dtype, tuple(fortran.shape)) is None  # np.load then
    arr = Array(np.zeros((2, 3), np.float32))
    assert npy_values(arr.data, "float16", (2, 3)) is None  # dtype disagrees with the header
    assert npy_values(b"garbage", "float32", (1,)) is None
