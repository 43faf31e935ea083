"""deem: DEEM (diffusion models as the eyes of LLMs) with fast deformable-attention kernels."""

from deem._native import build_info, cuda_kernels_built

__version__ = "0.1.0"

__all__ = ["__version__", "build_info", "cuda_kernels_built"]
