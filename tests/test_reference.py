"""The test reference itself: its torch form (which the CUDA tests take on the
GPU) against its numpy form, on CPU, so that both compute the same function."""
import numpy as np
import pytest
import torch

from helpers import (make_weight, make_x, np_pack_rows, np_unpack_rows, ref_dequantize,
                     ref_matmul, ref_matmul_t, torch_pack_rows, torch_unpack_rows)


@pytest.mark.parametrize("w_bit", (2, 4, 8))
def test_torch_packing_matches_numpy(w_bit):
    """Every code value, words with the top bit set among them (int32 < 0)."""
    q = torch.randint(0, 2**w_bit, (7, 96 * 32 // w_bit))
    q[0, : 32 // w_bit] = 2**w_bit - 1  # a word of all ones: -1
    words = torch_pack_rows(q, w_bit)
    assert words.dtype == torch.int32 and (words < 0).any()
    assert np.array_equal(words.numpy(), np_pack_rows(q.numpy(), w_bit))
    assert torch.equal(torch_unpack_rows(words, w_bit), q)
    assert np.array_equal(np_unpack_rows(words.numpy(), w_bit), q.numpy())


@pytest.mark.parametrize("w_bit", (2, 4, 8))
@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_torch_reference_matches_numpy(w_bit, group_size):
    N, K = 45, 256
    qweight, scales, zeros = make_weight(N, K, w_bit, group_size, torch.float16)
    x = make_x((3,), K, torch.float16)
    perm = torch.randperm(K).to(torch.int32)
    bias = torch.randn(N).to(torch.float16)
    for p, b in ((None, None), (perm, bias)):
        ref = ref_matmul(x, qweight, scales, zeros, w_bit, group_size, p, b)
        ref_t = ref_matmul_t(x, qweight, scales, zeros, w_bit, group_size, p, b)
        assert ref_t.dtype == torch.float64
        torch.testing.assert_close(ref_t, ref, rtol=1e-12, atol=1e-12)
    W = ref_dequantize(qweight, scales, zeros, w_bit, group_size)
    assert not np.all(W == 0)
