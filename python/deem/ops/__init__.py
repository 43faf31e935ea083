"""Custom ops over the compiled core, with pure-PyTorch references."""

from deem.ops._strategy import get_grad_value_strategy, grad_value_strategy, set_grad_value_strategy
from deem.ops.mmfs import mmfs_core
from deem.ops.msda import ms_deform_attn
from deem.ops.reference import mmfs_core_reference, mmfs_softmax, ms_deform_attn_reference

__all__ = [
    "get_grad_value_strategy",
    "grad_value_strategy",
    "mmfs_core",
    "mmfs_core_reference",
    "mmfs_softmax",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "set_grad_value_strategy",
]
