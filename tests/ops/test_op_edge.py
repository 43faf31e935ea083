"""The op edge: sizes beyond the kernels' int32 indices, memory errors, devices, argument types, the exact
ignore_token shape, empty problems, non-finite locations, one C++ call per op direction, the per-device
kernel registration and the lazily loaded compiled core."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import deem.ops._common as common
import deem.ops.mmfs as mmfs_module
import deem.ops.msda as msda_module
from deem._native import dl, lib
from deem.ops import (
    NonFiniteLocationError,
    check_finite,
    mmfs_core,
    mmfs_core_reference,
    ms_deform_attn,
    ms_deform_attn_reference,
    reference_kernels,
)
from tests.ops.helpers import mmfs_problem, msda_problem, rel_l2

MSDA_NAMES = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
MMFS_NAMES = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_logits",
              "image_visible", "ignore_token"]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def empty_msda(levels, N=0, Lq=3, M=2, D=4, P=2, dtype=torch.float32):
    """An msda call whose tensors are empty (N = 0) but whose level table declares `levels`."""
    S = sum(h * w for h, w in levels)
    starts, total = [], 0
    for h, w in levels:
        starts.append(total)
        total += h * w
    L = len(levels)
    return (torch.empty(N, S, M, D, dtype=dtype), torch.tensor(levels), torch.tensor(starts),
            torch.empty(N, Lq, M, L, P, 2), torch.empty(N, Lq, M, L, P, dtype=dtype))


# ---------------------------------------------------------------------------------------------- sizes

def test_level_whose_pixel_count_wraps_int64_is_refused():
    """274177 * 67280421310721 = 2^64 + 1: unchecked int64 arithmetic sees a 1-pixel level and the kernel
    then indexes with the truncated height and width far outside value."""
    shapes = torch.tensor([[274177, 67280421310721]])
    v = torch.randn(1, 1, 2, 4)
    loc, w = torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2)
    with pytest.raises(ValueError, match=r"spatial_shapes: level 0 has size \(274177, 67280421310721\).*int32"):
        ms_deform_attn(v, shapes, torch.tensor([0]), loc, w)


@pytest.mark.parametrize("levels", [[(46341, 46341)], [(2**31, 1)], [(1, 2**31 - 1), (1, 1)]])
def test_levels_beyond_int32_rows_are_refused(levels):
    with pytest.raises(ValueError, match=r"spatial_shapes: .*(int32|2\^31 - 1)"):
        ms_deform_attn(*empty_msda(levels))


@pytest.mark.parametrize("levels", [[(46340, 46340)], [(1, 2**31 - 2), (1, 1)]])
def test_levels_at_the_int32_limit_run_on_an_empty_batch(levels):
    args = list(empty_msda(levels))
    for i in (0, 3, 4):
        args[i].requires_grad_()
    out = ms_deform_attn(*args)
    assert out.shape == (0, 3, 8)
    grads = torch.autograd.grad(out.sum(), [args[0], args[3], args[4]])
    assert [g.shape for g in grads] == [args[0].shape, args[3].shape, args[4].shape]


@pytest.mark.parametrize("dim, name", [(1, "Lq"), (2, "M"), (3, "D")])
def test_dimensions_beyond_int32_are_refused(dim, name):
    sizes = dict(Lq=3, M=2, D=4)
    sizes[name] = 2**31
    args = empty_msda([(3, 3)], **sizes)
    with pytest.raises(ValueError, match=rf"{name} \(dimension {dim}\) = 2147483648 is outside what the kernels index"):
        ms_deform_attn(*args)


def test_mmfs_images_beyond_int32_are_refused():
    q = mmfs_problem(1, 2, 1, 2, 4, [(2, 2)], 2, dtype=torch.float32, ignore=False)
    n_img = 2**31
    with pytest.raises(ValueError, match=r"n_images \(dimension 2\) = 2147483648"):
        mmfs_core(torch.empty(0, 4 * n_img, 2, 4), q.spatial_shapes, q.level_start_index,
                  torch.empty(0, 2, n_img, 2, 2, 2), torch.empty(0, 2, n_img, 2, 1, 2),
                  torch.empty(0, 2, n_img, dtype=torch.bool))


def test_failed_scratch_allocation_raises_memory_error():
    """The CPU backward's per-thread d(value) rows (here 64 MiB) do not fit under an address-space limit: a
    MemoryError naming the buffer, not an abort from inside an OpenMP region."""
    proc = run_python("""
        import resource, torch
        from deem._native import dl, lib
        N, S, M, D, Lq, P = 1, 1 << 18, 1, 64, 4, 2
        value = torch.randn(N, S, M, D)
        shapes, starts = torch.tensor([[1 << 9, 1 << 9]]), torch.tensor([0])
        loc, w = torch.rand(N, Lq, M, 1, P, 2), torch.rand(N, Lq, M, 1, P)
        grads = [torch.empty_like(t) for t in (value, loc, w)]
        g = torch.randn(N, Lq, M, D)
        kernels = lib()  # mapped before the limit: the limit is for the backward's scratch rows, not the library
        vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), vm + (16 << 20)))
        try:
            kernels.msda_backward(dl(value), dl(shapes), dl(starts), dl(loc), dl(w), dl(g), *map(dl, grads),
                                num_threads=1)
        except MemoryError as err:
            print("MemoryError:", err)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MemoryError: deem: the CPU backward (per-thread d(value) rows) needs 64" in proc.stdout


# -------------------------------------------------------------------------------------- devices and types

@pytest.mark.parametrize("name", MSDA_NAMES)
def test_msda_meta_tensor_among_cpu_tensors_is_refused(name):
    p = msda_problem(1, 3, 2, 4, [(3, 3), (2, 2)], 2, dtype=torch.float32)
    args = dict(zip(MSDA_NAMES, p.args()))
    args[name] = args[name].to("meta")
    device = "meta" if name == "value" else "cpu"
    with pytest.raises(ValueError, match=rf"expected a tensor on ({device}|the CPU or meta) \(the device of value\)"):
        ms_deform_attn(**args)


@pytest.mark.parametrize("name", [n for n in MMFS_NAMES if n != "value"])
def test_mmfs_meta_tensor_among_cpu_tensors_is_refused(name):
    q = mmfs_problem(1, 3, 2, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    args = dict(zip(MMFS_NAMES, q.args()))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name}: expected a tensor on cpu \(the device of value\), got meta"):
        mmfs_core(**args)


def test_the_raw_op_refuses_mixed_devices_too():
    """Dispatch picks the meta kernel when any input is on meta; it must not hand back uninitialised memory."""
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    args = list(p.args())
    args[3] = args[3].to("meta")
    with pytest.raises(ValueError, match=r"sampling_locations: expected a tensor on cpu"):
        torch.ops.deem.ms_deform_attn(*args)


def test_all_meta_propagates_shapes():
    p = msda_problem(2, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    out = ms_deform_attn(*[t.to("meta") for t in p.args()])
    assert out.device.type == "meta" and out.shape == (2, 3, 8)


@pytest.mark.parametrize("name", MSDA_NAMES)
@pytest.mark.parametrize("bad", [None, 3, [[3, 3]], "x"])
def test_msda_non_tensor_argument_is_a_type_error(name, bad):
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    args = dict(zip(MSDA_NAMES, p.args()))
    args[name] = bad
    with pytest.raises(TypeError, match=rf"ms_deform_attn: {name} must be a torch.Tensor, got {type(bad).__name__}"):
        ms_deform_attn(**args)


@pytest.mark.parametrize("name", MMFS_NAMES)
def test_mmfs_non_tensor_argument_is_a_type_error(name):
    q = mmfs_problem(1, 3, 2, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    args = dict(zip(MMFS_NAMES, q.args()))
    args[name] = [1.0, 2.0]
    with pytest.raises(TypeError, match=rf"mmfs_core: {name} must be a torch.Tensor.*, got list"):
        mmfs_core(**args)


def test_a_cast_does_not_hide_a_non_contiguous_argument():
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    loc = p.sampling_locations.double().transpose(-1, -2).contiguous().transpose(-1, -2)
    with pytest.raises(ValueError, match=r"sampling_locations: expected a contiguous tensor"):
        ms_deform_attn(p.value, p.spatial_shapes, p.level_start_index, loc, p.attention_weights)


# ------------------------------------------------------------------------------------------ ignore token

@pytest.mark.parametrize("shape", ["DM", "flat", "param"])
def test_ignore_token_must_be_exactly_m_by_d(shape):
    q = mmfs_problem(1, 3, 2, 2, 8, [(3, 3)], 2, dtype=torch.float32)
    ign = q.ignore_token
    bad = {"DM": ign.t().contiguous(), "flat": ign.reshape(-1), "param": ign.reshape(1, 1, 1, -1)}[shape]
    with pytest.raises(ValueError, match=r"ignore_token: expected M\*D = 16 elements as shape \[M, D\] = \[2, 8\]"):
        mcall(q, ignore_token=bad)


def mcall(q, **changes):
    args = dict(zip(MMFS_NAMES, q.args()))
    args.update(changes)
    return mmfs_core(**args)


# ------------------------------------------------------------------------------------------ empty problems

@pytest.mark.parametrize("N, Lq", [(0, 3), (2, 0), (0, 0)])
def test_mmfs_backward_of_an_empty_problem_with_a_trainable_ignore_token(N, Lq):
    q = mmfs_problem(max(N, 1), max(Lq, 1), 2, 2, 4, [(3, 3), (1, 2)], 2, dtype=torch.float32)
    leaves = [q.value[:N].clone().requires_grad_(), q.sampling_locations[:N, :Lq].clone().requires_grad_(),
              q.attention_logits[:N, :Lq].clone().requires_grad_(), q.ignore_token.clone().requires_grad_()]
    out = mmfs_core(leaves[0], q.spatial_shapes, q.level_start_index, leaves[1], leaves[2],
                    q.image_visible[:N, :Lq].contiguous(), leaves[3])
    assert out.shape == (N, Lq, 8)
    grads = torch.autograd.grad(out.sum(), leaves)
    for g, x in zip(grads, leaves):
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(x))


@pytest.mark.parametrize("N, Lq", [(0, 3), (2, 0)])
def test_msda_backward_of_an_empty_problem(N, Lq):
    p = msda_problem(max(N, 1), max(Lq, 1), 2, 4, [(3, 3)], 2, dtype=torch.float32)
    leaves = [p.value[:N].clone().requires_grad_(), p.sampling_locations[:N, :Lq].clone().requires_grad_(),
              p.attention_weights[:N, :Lq].clone().requires_grad_()]
    out = ms_deform_attn(leaves[0], p.spatial_shapes, p.level_start_index, leaves[1], leaves[2])
    grads = torch.autograd.grad(out.sum(), leaves)
    for g, x in zip(grads, leaves):
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(x))


# ------------------------------------------------------------------------------------ non-finite locations

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_locations_sample_nothing(bad):
    p = msda_problem(1, 4, 2, 8, [(4, 4), (2, 2)], 3, dtype=torch.float64, seed=3)
    p.sampling_locations[0, 1, 0, 0, 1, 0] = bad
    p.sampling_locations[0, 2, 1, 1, 2, 1] = bad
    leaves = [p.value.requires_grad_(), p.sampling_locations.requires_grad_(), p.attention_weights.requires_grad_()]
    out = ms_deform_attn(leaves[0], p.spatial_shapes, p.level_start_index, leaves[1], leaves[2])
    moved = p.sampling_locations.detach().clone()
    moved[~torch.isfinite(moved).all(-1)] = -10.0  # outside every map
    ref_leaves = [p.value.detach().clone().requires_grad_(), moved.requires_grad_(),
                  p.attention_weights.detach().clone().requires_grad_()]
    ref = ms_deform_attn_reference(ref_leaves[0], p.spatial_shapes, p.level_start_index, ref_leaves[1], ref_leaves[2])
    assert rel_l2(out, ref) < 1e-12
    grads = torch.autograd.grad(out.sum(), leaves)
    ref_grads = torch.autograd.grad(ref.sum(), ref_leaves)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_l2(g, r) < 1e-10


def test_check_finite_mode_raises_a_named_error():
    p = msda_problem(1, 4, 2, 8, [(4, 4)], 3, dtype=torch.float32)
    q = mmfs_problem(1, 3, 2, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    p.sampling_locations[0, 0, 0, 0, 0, 0] = float("nan")
    q.sampling_locations[0, 1, 0, 0, 0, 1] = float("inf")
    assert ms_deform_attn(*p.args()).isfinite().all()  # off: the point samples nothing
    previous = check_finite(True)
    try:
        with pytest.raises(NonFiniteLocationError, match=r"ms_deform_attn: sampling_locations has 1 NaN or infinite"):
            ms_deform_attn(*p.args())
        with pytest.raises(ValueError, match=r"mmfs_core: sampling_locations has 1 NaN or infinite"):
            mmfs_core(*q.args())
    finally:
        check_finite(previous)


def test_check_finite_mode_from_the_environment():
    proc = run_python("""
        import torch
        from deem.ops import ms_deform_attn
        loc, w = torch.full((1, 1, 1, 1, 1, 2), float("nan")), torch.ones(1, 1, 1, 1, 1)
        try:
            ms_deform_attn(torch.randn(1, 4, 1, 2), torch.tensor([[2, 2]]), torch.tensor([0]), loc, w)
        except ValueError as err:
            print(type(err).__name__)
    """, DEEM_CHECK_FINITE="1")
    assert proc.stdout.strip() == "NonFiniteLocationError", proc.stderr[-2000:]


# ------------------------------------------------------------------------------ the binding edge itself

class CountingLib:
    """Wraps deem._C and records every call into it."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        target = getattr(lib(), name)
        if not callable(target):
            return target

        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return target(*args, **kwargs)

        return wrapper


def test_one_compiled_call_per_op_direction(monkeypatch):
    counter = CountingLib()
    monkeypatch.setattr(msda_module, "lib", lambda: counter)
    monkeypatch.setattr(mmfs_module, "lib", lambda: counter)
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    v = p.value.requires_grad_()
    ms_deform_attn(v, *p.args()[1:]).sum().backward()
    q = mmfs_problem(1, 3, 2, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    w = q.value.requires_grad_()
    mmfs_core(w, *q.args()[1:]).sum().backward()
    assert counter.calls == ["msda_forward", "msda_backward", "mmfs_forward", "mmfs_backward"]


def test_kernels_are_registered_per_device_with_the_reference_as_default(monkeypatch):
    for op in ("deem::ms_deform_attn", "deem::ms_deform_attn_backward", "deem::mmfs_core", "deem::mmfs_core_backward"):
        for key in ("CPU", "CUDA", "CompositeExplicitAutograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    counter = CountingLib()
    monkeypatch.setattr(msda_module, "lib", lambda: counter)
    monkeypatch.setattr(mmfs_module, "lib", lambda: counter)
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float64)
    q = mmfs_problem(1, 3, 2, 2, 4, [(3, 3)], 2, dtype=torch.float64)
    with reference_kernels():
        out = ms_deform_attn(*p.args())
        out_m = mmfs_core(*q.args())
    assert counter.calls == []
    assert torch.equal(out, ms_deform_attn_reference(*p.args()))
    assert torch.equal(out_m, mmfs_core_reference(*q.args())[0])
    ms_deform_attn(*p.args())
    assert counter.calls == ["msda_forward"]
    assert common._registered  # the ops the context manager switches


def test_binding_refuses_a_bad_strategy_code():
    p = msda_problem(1, 3, 2, 4, [(3, 3)], 2, dtype=torch.float32)
    grads = [torch.empty_like(t) for t in (p.value, p.sampling_locations, p.attention_weights)]
    expected = r"strategy: expected 0 \(auto\), 1 \(atomic\), 2 \(owner\) or 3 \(tensor\), got 7"
    with pytest.raises(ValueError, match=expected):
        lib().msda_backward(*map(dl, p.args()), dl(torch.zeros(1, 3, 2, 4)), *map(dl, grads), strategy=7)


def test_import_deem_loads_no_compiled_code():
    proc = run_python("""
        import sys
        import deem, deem.data, deem.eval, deem.ops, deem.models
        print("loaded" if "deem._C" in sys.modules else "not loaded")
        info = deem.build_info()
        print(info["compiled_core"] is not None, "deem._C" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["not loaded", "True True"]


def test_without_the_compiled_core_only_kernel_calls_fail():
    proc = run_python("""
        import sys
        sys.modules["deem._C"] = None  # as if the package had been installed without its binary
        import torch
        import deem, deem.ops
        print(deem.build_info()["compiled_core"], deem.cuda_kernels_built())
        try:
            deem.ops.ms_deform_attn(torch.randn(1, 4, 1, 2), torch.tensor([[2, 2]]), torch.tensor([0]),
                                    torch.rand(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1))
        except ImportError as err:
            print("ImportError:", err)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "None False"
    assert lines[1].startswith("ImportError: deem's compiled kernels (deem._C) cannot be loaded")


# -------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_cuda_mmfs_cpu_tensor_among_cuda_tensors_is_refused(cuda_device):
    q = mmfs_problem(1, 3, 2, 2, 32, [(3, 3)], 2, dtype=torch.float32, device=cuda_device)
    with pytest.raises(ValueError, match=r"image_visible: expected a tensor on cuda:0 .* got cpu"):
        mcall(q, image_visible=q.image_visible.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("strategy, code", [("atomic", 1), ("owner", 2), ("tensor", 3)])
def test_cuda_backward_reports_the_strategy_that_ran(cuda_device, strategy, code):
    p = msda_problem(1, 8, 2, 64, [(8, 8), (4, 4)], 4, dtype=torch.float16, device=cuda_device)
    grads = [torch.empty_like(t) for t in (p.value, p.sampling_locations, p.attention_weights)]
    workspace = []

    def alloc(shape, dtype):
        workspace.append(torch.empty(shape, dtype=getattr(torch, dtype), device=cuda_device))
        return dl(workspace[-1])

    g = torch.randn(1, 8, 2, 64, device=cuda_device, dtype=torch.float16)
    ran = lib().msda_backward(*map(dl, p.args()), dl(g), *map(dl, grads), strategy=code, workspace=alloc,
                              stream=torch.cuda.current_stream().cuda_stream)
    assert ran == code
    assert len(workspace) == (1 if strategy == "atomic" else 0)  # the fp32 buffer only where it is needed


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, allowed", [(torch.float16, {3}), (torch.bfloat16, {3}), (torch.float32, {1, 2})])
def test_cuda_auto_runs_the_measured_fastest_strategy_that_applies(cuda_device, dtype, allowed):
    """'auto' follows cpp/src/cuda/strategy_measured.inc: tensor (3) was the fastest on every measured case and
    applies to 16-bit values; float32 falls to the faster of atomic (1) and owner (2) there."""
    p = msda_problem(1, 64, 2, 64, [(32, 32), (16, 16), (8, 8)], 8, dtype=dtype, device=cuda_device)
    grads = [torch.empty_like(t) for t in (p.value, p.sampling_locations, p.attention_weights)]
    workspace = []

    def alloc(shape, dtype):
        workspace.append(torch.empty(shape, dtype=getattr(torch, dtype), device=cuda_device))
        return dl(workspace[-1])

    g = torch.randn(1, 64, 2, 64, device=cuda_device, dtype=dtype)
    ran = lib().msda_backward(*map(dl, p.args()), dl(g), *map(dl, grads), strategy=0, workspace=alloc,
                              stream=torch.cuda.current_stream().cuda_stream)
    assert ran in allowed
