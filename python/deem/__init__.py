"""deem: DEEM (diffusion models as the eyes of LLMs) with fast deformable-attention kernels.

`import deem` loads no compiled code: the kernels (`deem._C`) load on the first op call, so data and scoring
code runs without the binary. `deem.build_info()` reports whether it is present.
"""

__version__ = "0.1.0"

from deem._native import build_info, cuda_kernels_built

__all__ = ["__version__", "build_info", "cuda_kernels_built"]
