"""Access to the compiled core `deem._C` and the small helpers every op binding needs."""

from __future__ import annotations

from typing import Any

import torch

from deem import _C

GRAD_VALUE_STRATEGIES = {"auto": 0, "atomic": 1, "owner": 2}


def cuda_kernels_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels (nvcc was found at build time)."""
    return bool(_C.cuda_kernels_built())


def build_info() -> dict[str, Any]:
    """Versions and build options of the installed package."""
    return {
        "deem": _C.__version__,
        "cuda_kernels": cuda_kernels_built(),
        "max_levels": int(_C.max_levels),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }


def dl(t: torch.Tensor | None) -> Any:
    """A DLPack capsule for the binding (None passes through)."""
    if t is None:
        return None
    return torch.utils.dlpack.to_dlpack(t.detach())


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of the tensor's device as an integer handle (0 on the CPU)."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


def uses_kernels(t: torch.Tensor) -> bool:
    """Whether compiled kernels serve tensors on this device (else the PyTorch reference does)."""
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and cuda_kernels_built()


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """The CUDA kernels read 16-byte vectors: copy a tensor whose data pointer is not aligned."""
    if t is None or t.device.type != "cuda" or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def host_index(t: torch.Tensor) -> torch.Tensor:
    """Shape tensors are read on the host; keep them on the CPU to avoid a device sync."""
    return t if t.device.type == "cpu" else t.cpu()
