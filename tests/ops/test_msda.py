"""deem::ms_deform_attn against the float64 grid_sample reference (CPU, and CUDA with -m cuda)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deem.ops import grad_value_strategy, ms_deform_attn, ms_deform_attn_reference
from tests.ops.helpers import TOLERANCE, msda_problem, rel_l2

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
STRATEGIES = ["atomic", "owner", "tensor"]


def reference_grads(p, grad_out):
    inputs = [p.value.double().cpu().requires_grad_(), p.sampling_locations.double().cpu().requires_grad_(),
              p.attention_weights.double().cpu().requires_grad_()]
    out = ms_deform_attn_reference(inputs[0], p.spatial_shapes, p.level_start_index, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out.double().cpu())
    return out.detach(), grads


def op_grads(p, grad_out):
    inputs = [p.value.clone().requires_grad_(), p.sampling_locations.clone().requires_grad_(),
              p.attention_weights.clone().requires_grad_()]
    out = ms_deform_attn(inputs[0], p.spatial_shapes, p.level_start_index, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out.detach(), grads


def check_against_reference(p, tol_out, tol_grad):
    N, Lq, M = p.sampling_locations.shape[:3]
    D = p.value.shape[-1]
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64).to(p.value)
    out, grads = op_grads(p, grad_out)
    ref, ref_grads = reference_grads(p, grad_out)
    assert out.dtype == p.value.dtype and out.shape == (N, Lq, M * D)
    assert torch.isfinite(out).all()
    assert rel_l2(out.cpu(), ref) <= tol_out
    for name, g, r, x in zip(("value", "locations", "weights"), grads, ref_grads,
                             (p.value, p.sampling_locations, p.attention_weights)):
        assert g.dtype == x.dtype
        err = rel_l2(g.cpu(), r)
        assert err <= tol_grad, f"grad {name}: rel err {err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_deem_like_shape(device, dtype):
    p = msda_problem(2, 7, 4, 32, [(8, 8), (4, 4), (2, 2), (1, 1)], 8, dtype=dtype, device=device, seed=1)
    tol = TOLERANCE[dtype]
    # gradients of 16-bit values: fp32 accumulation, one rounding of each output element
    check_against_reference(p, tol, max(tol, 1e-10) * (4 if dtype in (torch.float16, torch.bfloat16) else 10))


@pytest.mark.parametrize("device", DEVICES)
def test_weights_in_float32_with_half_values(device):
    p = msda_problem(1, 5, 2, 64, [(6, 6), (3, 3)], 4, dtype=torch.bfloat16, device=device, weight_dtype=torch.float32)
    check_against_reference(p, 8e-3, 3e-2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 2), Lq=st.integers(1, 6), M=st.integers(1, 3), D=st.sampled_from([1, 3, 8, 16]),
    shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=5),
    P=st.integers(1, 16), seed=st.integers(0, 2**16),
)
def test_random_shapes_cpu_float64(N, Lq, M, D, shapes, P, seed):
    p = msda_problem(N, Lq, M, D, shapes, P, seed=seed, spread=(-0.3, 1.3))
    check_against_reference(p, 1e-12, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    p = msda_problem(1, 3, 2, 4, [(3, 4), (2, 2), (1, 1)], 3, device=device, seed=3)
    if device == "cuda":
        p = msda_problem(1, 3, 2, 16, [(3, 4), (2, 2), (1, 1)], 3, device=device, seed=3)
    inputs = (p.value.requires_grad_(), p.sampling_locations.requires_grad_(), p.attention_weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, xy, w: ms_deform_attn(v, p.spatial_shapes, p.level_start_index, xy, w), inputs, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_and_border_locations(device):
    p = msda_problem(1, 4, 2, 8 if device == "cpu" else 32, [(5, 6), (2, 3)], 6, device=device, seed=4)
    loc = p.sampling_locations
    special = torch.tensor([[-0.5, 0.5], [1.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.999, -0.001], [-1.0, 2.0]],
                           dtype=loc.dtype, device=loc.device)
    loc[:, :, :, :, :] = special.view(1, 1, 1, 1, 6, 2)
    p.sampling_locations = loc
    # exactly on pixel centres: x = (i + 0.5) / W
    p.sampling_locations[0, 0, 0, 0, 0] = torch.tensor([2.5 / 6, 1.5 / 5], dtype=loc.dtype)
    check_against_reference(p, 1e-12, 1e-10)
    out = ms_deform_attn(*p.args())
    # the points far outside the maps contribute nothing
    far = p.sampling_locations.clone()
    far[:] = torch.tensor([3.0, -2.0], dtype=loc.dtype)
    zero = ms_deform_attn(p.value, p.spatial_shapes, p.level_start_index, far, p.attention_weights)
    assert torch.equal(zero, torch.zeros_like(zero))
    assert out.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_single_pixel_levels_and_many_levels(device):
    D = 4 if device == "cpu" else 32
    shapes = [(1, 1)] * 20 + [(2, 3), (3, 1)] * 14  # 48 levels, many of them 1x1
    p = msda_problem(1, 3, 2, D, shapes, 2, device=device, seed=5)
    check_against_reference(p, 1e-12, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_many_levels_up_to_the_limit(device):
    shapes = [(1 + i % 3, 1 + i % 2) for i in range(256)]
    p = msda_problem(1, 2, 1, 8 if device == "cpu" else 32, shapes, 1, device=device, seed=6)
    check_against_reference(p, 1e-12, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [32, 64, 128])
def test_head_dims(device, D):
    p = msda_problem(1, 5, 2, D, [(4, 4), (2, 2)], 16, dtype=torch.float32, device=device, seed=D)
    check_against_reference(p, 1e-6, 1e-5)


def test_empty_query_set():
    p = msda_problem(2, 0, 2, 8, [(3, 3)], 2)
    out = ms_deform_attn(*p.args())
    assert out.shape == (2, 0, 16)
    v = p.value.clone().requires_grad_()
    ms_deform_attn(v, *p.args()[1:]).sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_locations_in_value_dtype_are_accepted():
    p = msda_problem(1, 3, 2, 8, [(3, 3), (2, 2)], 2, dtype=torch.bfloat16)
    loc16 = p.sampling_locations.to(torch.bfloat16).requires_grad_()
    out = ms_deform_attn(p.value, p.spatial_shapes, p.level_start_index, loc16, p.attention_weights)
    ref = ms_deform_attn_reference(p.value.double(), p.spatial_shapes, p.level_start_index, loc16.double(),
                                   p.attention_weights.double())
    assert rel_l2(out, ref) <= 8e-3
    out.float().sum().backward()
    assert loc16.grad.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_grad_value_strategies(cuda_device, strategy, dtype):
    p = msda_problem(2, 33, 4, 64, [(16, 16), (8, 8), (4, 4), (2, 2)], 8, dtype=dtype, device=cuda_device, seed=7)
    tol = TOLERANCE[dtype]
    with grad_value_strategy(strategy):
        if strategy == "tensor" and dtype == torch.float32:
            with pytest.raises(ValueError, match="'tensor' needs float16 or bfloat16"):
                check_against_reference(p, tol, tol * 4)
            return
        check_against_reference(p, tol, tol * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_contended_locations(cuda_device, dtype):
    """Every query samples the same points (DEEM's initial state): the worst case for atomics."""
    p = msda_problem(1, 300, 2, 64, [(8, 8), (4, 4)], 8, dtype=dtype, device=cuda_device, seed=8)
    p.sampling_locations[:] = p.sampling_locations[:, :1]
    tol = TOLERANCE[dtype]
    for strategy in STRATEGIES:
        if strategy == "tensor" and dtype == torch.float32:
            continue
        with grad_value_strategy(strategy):
            check_against_reference(p, tol, tol * 10)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_strategy_tiles(cuda_device, D, dtype):
    """Row tiles that cut through levels (a 23x19 level spans tiles of 128 and 256 rows), a last row tile and a
    last query step that are partial (Lq = 301), level tables of odd sizes, float32 weights, points outside."""
    p = msda_problem(2, 301, 3, D, [(23, 19), (7, 9), (1, 1), (12, 12)], 5, dtype=dtype, device=cuda_device,
                     seed=12, spread=(-0.2, 1.2), weight_dtype=torch.float32 if D == 64 else None)
    tol = TOLERANCE[dtype]
    with grad_value_strategy("tensor"):
        check_against_reference(p, tol, tol * 4)


@pytest.mark.cuda
def test_cuda_tensor_strategy_is_deterministic(cuda_device):
    p = msda_problem(2, 257, 4, 64, [(32, 32), (16, 16), (8, 8)], 8, dtype=torch.bfloat16, device=cuda_device,
                     seed=13)
    p.sampling_locations[:, 1:] = p.sampling_locations[:, :1] + 0.01 * p.sampling_locations[:, 1:]  # collisions
    g = torch.randn(2, 257, 4, 64, generator=torch.Generator().manual_seed(0)).to(cuda_device, torch.bfloat16)
    with grad_value_strategy("tensor"):
        runs = [torch.ops.deem.ms_deform_attn_backward(g, *p.args()) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel(cuda_device):
    p = msda_problem(2, 40, 4, 32, [(12, 10), (6, 5), (3, 3)], 4, dtype=torch.float32, seed=9)
    cpu = ms_deform_attn(*p.args())
    gpu = ms_deform_attn(*[t.to(cuda_device) if t.dtype.is_floating_point else t for t in p.args()])
    assert rel_l2(gpu.cpu(), cpu) <= 1e-6


@pytest.mark.cuda
def test_cuda_graph_capture(cuda_device):
    p = msda_problem(2, 64, 4, 64, [(16, 16), (8, 8)], 4, dtype=torch.bfloat16, device=cuda_device, seed=10)
    v = p.value.clone().requires_grad_()
    static_out = torch.empty(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ms_deform_attn(v, *p.args()[1:]).float().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    v.grad = None
    with torch.cuda.graph(graph):
        static_out = ms_deform_attn(v, *p.args()[1:])
        static_out.float().sum().backward()
    new_value = torch.randn_like(p.value)
    v.data.copy_(new_value)
    graph.replay()
    torch.cuda.synchronize()
    eager = ms_deform_attn(new_value, *p.args()[1:])
    assert rel_l2(static_out, eager) <= 1e-6
    assert v.grad is not None and torch.isfinite(v.grad).all()


@pytest.mark.cuda
def test_cuda_misaligned_view_is_handled(cuda_device):
    p = msda_problem(1, 9, 2, 64, [(6, 6), (3, 3)], 4, dtype=torch.bfloat16, device=cuda_device, seed=11)
    flat = torch.empty(p.value.numel() + 1, dtype=p.value.dtype, device=cuda_device)
    shifted = flat[1:].view_as(p.value)
    shifted.copy_(p.value)
    assert shifted.data_ptr() % 16 != 0
    out = ms_deform_attn(shifted, *p.args()[1:])
    assert torch.equal(out, ms_deform_attn(*p.args()))
