"""What every deem op shares: the dtype rule, the argument checks at the Python edge (before anything is
handed to DLPack), the optional finite-location check, and the per-device choice between a compiled kernel
and the PyTorch reference (torch.library registrations, not branches in the op bodies)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from deem._native import cuda_kernels_built

_check_finite = os.environ.get("DEEM_CHECK_FINITE", "0") not in ("", "0")
_registered: list = []  # the custom ops with compiled kernels, for `reference_kernels`
INDEX_ARGS = ("spatial_shapes", "level_start_index")


def location_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype rule: locations, logits, the softmax and every accumulation run in float64 for float64 values
    and in float32 for everything else (C++: `deem::acc_dtype` / `deem::acc_t`)."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


class NonFiniteLocationError(ValueError):
    """Sampling locations hold NaN or infinite entries while `check_finite` is on."""


def check_finite(enabled: bool = True) -> bool:
    """Turn the finite-location check on or off for later calls; returns the previous setting.

    The kernels treat a NaN or infinite location as outside every map (it samples nothing and gets a zero
    gradient); with the check on, such locations raise `NonFiniteLocationError` instead. The check reads the
    tensor on the host (a device sync on CUDA) and is meant for eager debugging. `DEEM_CHECK_FINITE=1` turns
    it on at import.
    """
    global _check_finite
    previous, _check_finite = _check_finite, bool(enabled)
    return previous


def require_finite(op: str, name: str, t: torch.Tensor) -> None:
    if not _check_finite or t.device.type == "meta" or not t.dtype.is_floating_point:
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteLocationError(f"{op}: {name} has {bad} NaN or infinite entries of {t.numel()} "
                                     f"(deem.ops.check_finite is on)")


def require_tensors(op: str, args: dict[str, object], optional: tuple[str, ...] = ()) -> None:
    """TypeError naming the first argument that is not a tensor (None only where `optional`)."""
    for name, t in args.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            kind = "a torch.Tensor or None" if name in optional else "a torch.Tensor"
            raise TypeError(f"{op}: {name} must be {kind}, got {type(t).__name__}")


def require_one_device(op: str, args: dict[str, torch.Tensor | None]) -> None:
    """Every tensor on the device of `value`; the level tables on the CPU (preferred) or that device."""
    device = args["value"].device
    for name, t in args.items():
        if t is None or t.device == device:
            continue
        if name in INDEX_ARGS and t.device.type == "cpu":
            continue
        where = "the CPU or " if name in INDEX_ARGS and device.type != "cpu" else ""
        raise ValueError(f"{name}: expected a tensor on {where}{device} (the device of value), got {t.device}")


def cast(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`. A cast would hide a bad layout (it copies into a fresh one), so a tensor that needs
    one must already be contiguous, as the kernels require of every argument."""
    if t.dtype == dtype:
        return t
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got shape {list(t.shape)} with strides "
                         f"{list(t.stride())} (call .contiguous())")
    return t.to(dtype)


def register_kernels(op, kernel: Callable, reference: Callable) -> None:
    """Serve `op` on the CPU by the compiled `kernel`, on CUDA by it where the build has CUDA kernels (else by
    `reference`); every other device falls to the op's default implementation, which is the reference."""
    op.register_kernel("cpu")(kernel)

    def cuda(*args):
        return (kernel if cuda_kernels_built() else reference)(*args)

    op.register_kernel("cuda")(cuda)
    _registered.append(op)


def register_cuda_kernel(op, kernel: Callable) -> None:
    """Serve `op` on CUDA by `kernel` (which itself falls back to the reference where the build or the problem has
    no compiled kernel); the CPU and every other device run the op's default implementation, the reference."""
    op.register_kernel("cuda")(kernel)
    _registered.append(op)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run every deem op (forward and backward) through its PyTorch reference, on every device."""
    with contextlib.ExitStack() as stack:
        for op in _registered:
            for device in ("cpu", "cuda"):
                stack.enter_context(op.set_kernel_enabled(device, False))
        yield
