"""The compiled core `deem._C`, loaded on first use, and the helpers that hand tensors to it."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch

GRAD_VALUE_STRATEGIES = {"auto": 0, "atomic": 1, "owner": 2, "tensor": 3}


@functools.cache
def lib() -> ModuleType:
    """`deem._C`, imported on the first call (`import deem` needs no binary)."""
    try:
        from deem import _C
    except ImportError as err:
        raise ImportError(f"deem's compiled kernels (deem._C) cannot be loaded ({err}); install the package with "
                          "`pip install .`, which builds them. Data and scoring code runs without them.") from err
    return _C


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (False when there is no extension)."""
    try:
        return bool(lib().cuda_kernels_built())
    except ImportError:
        return False


def build_info() -> dict[str, Any]:
    """Versions and build options of the installed package; works without the compiled core."""
    from deem import __version__

    try:
        core = lib()
        compiled: dict[str, Any] = dict(compiled_core=core.__version__, cuda_kernels=bool(core.cuda_kernels_built()),
                                        max_levels=int(core.max_levels))
    except ImportError as err:
        compiled = dict(compiled_core=None, cuda_kernels=False, max_levels=None, compiled_core_error=str(err))
    return {"deem": __version__, **compiled, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}


def dl(t: torch.Tensor | None) -> Any:
    """A DLPack capsule for the binding (None passes through)."""
    if t is None:
        return None
    return torch.utils.dlpack.to_dlpack(t.detach())


class Outputs:
    """The allocator a binding calls, once it has validated its inputs, for each output and workspace it
    needs: `(shape, dtype name) -> DLPack capsule` of an uninitialised tensor on `device`, kept in `tensors`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.tensors: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype: str) -> Any:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        self.tensors.append(t)
        return dl(t)


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of the tensor's device as an integer handle (0 on the CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """The CUDA kernels read 16-byte vectors: copy a tensor whose data pointer is not aligned."""
    if t is None or t.device.type != "cuda" or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def host_index(t: torch.Tensor) -> torch.Tensor:
    """Shape tensors are read on the host; keep them on the CPU to avoid a device sync."""
    return t if t.device.type == "cpu" else t.cpu()
