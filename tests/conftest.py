import socket
import subprocess
import sys

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


def _run_torchrun(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS` on a free local port (text output captured)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def torchrun():
    """Launch two local processes under torchrun: `torchrun(args, timeout=..., env=..., cwd=...)`."""
    return _run_torchrun


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine OpenMP hand-offs make them many
    times slower. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
