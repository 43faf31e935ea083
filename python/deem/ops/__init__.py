"""Custom ops over the compiled core, with pure-PyTorch references.

Importing this package loads no compiled code: deem._C loads on the first kernel call.
"""

from deem.ops._common import NonFiniteLocationError, check_finite, location_dtype, reference_kernels
from deem.ops._strategy import get_grad_value_strategy, grad_value_strategy, set_grad_value_strategy
from deem.ops.masked_mse import masked_mse, masked_mse_reference
from deem.ops.mmfs import mmfs_core
from deem.ops.msda import ms_deform_attn
from deem.ops.reference import mmfs_core_reference, mmfs_softmax, ms_deform_attn_reference
from deem.ops.resampler import qformer_attention, qformer_attention_reference

__all__ = [
    "NonFiniteLocationError",
    "check_finite",
    "get_grad_value_strategy",
    "grad_value_strategy",
    "location_dtype",
    "masked_mse",
    "masked_mse_reference",
    "mmfs_core",
    "mmfs_core_reference",
    "mmfs_softmax",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "qformer_attention",
    "qformer_attention_reference",
    "reference_kernels",
    "set_grad_value_strategy",
]
