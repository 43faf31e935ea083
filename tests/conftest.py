import pytest
import torch

import deem


def pytest_collection_modifyitems(config, items):
    """CUDA tests need a GPU and the CUDA kernels; without a GPU they are skipped, but a GPU
    machine whose build lacks the kernels fails them (a broken build must not pass silently)."""
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "cuda" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def cuda_device():
    assert deem.cuda_kernels_built(), "a CUDA GPU is present but deem was built without its CUDA kernels"
    return torch.device("cuda")
