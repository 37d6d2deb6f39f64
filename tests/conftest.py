import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import mpq_ops  # noqa: E402,F401


def devices():
    """CPU always; CUDA where present (skipped on CI, run on the GPU machine)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
