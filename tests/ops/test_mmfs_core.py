"""deem::mmfs_core against its float64 PyTorch reference (CPU, and CUDA with -m cuda)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deem.ops import grad_value_strategy, mmfs_core, mmfs_core_reference
from tests.ops.helpers import TOLERANCE, mmfs_problem, rel_l2

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def run(p, fn, grad_out):
    inputs = [p.value.clone().requires_grad_(), p.sampling_locations.clone().requires_grad_(),
              p.attention_logits.clone().requires_grad_()]
    ign = None if p.ignore_token is None else p.ignore_token.clone().requires_grad_()
    out = fn(inputs[0], p.spatial_shapes, p.level_start_index, inputs[1], inputs[2], p.image_visible, ign)
    if isinstance(out, tuple):
        out = out[0]
    wrt = inputs + ([ign] if ign is not None else [])
    return out.detach(), torch.autograd.grad(out, wrt, grad_out.to(out.dtype))


def reference(p, grad_out):
    cpu = type(p)(*[t.detach().cpu().double() if t is not None and t.dtype.is_floating_point else
                    (t.cpu() if t is not None else None) for t in p.args()])
    return run(cpu, mmfs_core_reference, grad_out.double().cpu())


def check(p, tol_out, tol_grad):
    N, Lq, _, M = p.sampling_locations.shape[:4]
    D = p.value.shape[-1]
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64, device=p.value.device)
    out, grads = run(p, mmfs_core, grad_out)
    ref, ref_grads = reference(p, grad_out)
    assert out.shape == (N, Lq, M * D) and out.dtype == p.value.dtype
    assert rel_l2(out.cpu(), ref) <= tol_out
    names = ["value", "locations", "logits", "ignore_token"]
    for name, g, r in zip(names, grads, ref_grads):
        err = rel_l2(g.cpu(), r)
        assert err <= tol_grad, f"grad {name}: rel err {err}"
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(device, dtype):
    p = mmfs_problem(2, 9, 3, 4, 32, [(8, 8), (4, 4), (2, 2)], 8, dtype=dtype, device=device, seed=1)
    tol = TOLERANCE[dtype]
    check(p, tol, max(tol * 4, 1e-10))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    N=st.integers(1, 2), Lq=st.integers(1, 5), n_img=st.integers(1, 4), M=st.integers(1, 3),
    D=st.sampled_from([1, 4, 8]), shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1,
                                                    max_size=4),
    P=st.integers(1, 16), ignore=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes_cpu_float64(N, Lq, n_img, M, D, shapes, P, ignore, seed):
    p = mmfs_problem(N, Lq, n_img, M, D, shapes, P, seed=seed, ignore=ignore)
    check(p, 1e-12, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    D = 4 if device == "cpu" else 16
    p = mmfs_problem(1, 3, 2, 2, D, [(3, 4), (2, 2), (1, 1)], 3, device=device, seed=2)
    inputs = (p.value.requires_grad_(), p.sampling_locations.requires_grad_(), p.attention_logits.requires_grad_(),
              p.ignore_token.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, xy, z, i: mmfs_core(v, p.spatial_shapes, p.level_start_index, xy, z, p.image_visible, i),
        inputs, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_query_that_sees_no_image_returns_the_ignore_token(device):
    D = 8 if device == "cpu" else 32
    p = mmfs_problem(1, 4, 2, 2, D, [(4, 4), (2, 2)], 4, device=device, seed=3)
    p.image_visible[:] = False
    out = mmfs_core(*p.args())
    expected = p.ignore_token.reshape(1, 1, -1).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-12)
    p.ignore_token = None
    assert torch.equal(mmfs_core(*p.args()), torch.zeros_like(out))


@pytest.mark.parametrize("device", DEVICES)
def test_invisible_images_are_not_read(device):
    """Garbage (NaN) in invisible images' value rows, locations and logits must not leak."""
    D = 8 if device == "cpu" else 32
    p = mmfs_problem(1, 5, 3, 2, D, [(4, 4), (2, 2)], 4, device=device, seed=4)
    p.image_visible[:] = torch.tensor([True, False, True], device=p.image_visible.device)
    S = 20
    p.value[:, S:2 * S] = float("nan")
    p.sampling_locations[:, :, 1] = float("nan")
    p.attention_logits[:, :, 1] = float("nan")
    out = mmfs_core(*p.args())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_single_pixel_levels_and_sixteen_images(device):
    D = 4 if device == "cpu" else 32
    p = mmfs_problem(1, 6, 16, 2, D, [(3, 3), (1, 1)], 2, device=device, seed=5)
    check(p, 1e-12, 1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["atomic", "owner", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_grad_value_strategies(cuda_device, strategy, dtype):
    p = mmfs_problem(2, 70, 4, 4, 64, [(16, 16), (8, 8), (4, 4)], 8, dtype=dtype, device=cuda_device, seed=6)
    tol = TOLERANCE[dtype]
    with grad_value_strategy(strategy):
        if strategy == "tensor" and dtype == torch.float32:
            with pytest.raises(ValueError, match="'tensor' needs float16 or bfloat16"):
                check(p, tol, tol * 4)
            return
        check(p, tol, tol * 4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_strategy_causal_images(cuda_device, dtype):
    """The LLM layout in small: causal visibility (query steps that see no image skip their products), image
    slices that span several row tiles (32x32 + 16x16 + 8x8 = 1344 rows), Lq not a multiple of the step."""
    p = mmfs_problem(2, 333, 3, 2, 64, [(32, 32), (16, 16), (8, 8)], 8, dtype=dtype, device=cuda_device, seed=9)
    start = torch.tensor([0, 140, 290], device=cuda_device)
    p.image_visible[:] = start[None, None, :] <= torch.arange(333, device=cuda_device)[None, :, None]
    tol = TOLERANCE[dtype]
    with grad_value_strategy("tensor"):
        check(p, tol, tol * 4)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel(cuda_device):
    p = mmfs_problem(2, 50, 3, 4, 64, [(12, 12), (6, 6), (3, 3)], 8, dtype=torch.float32, seed=7)
    cpu = mmfs_core(*p.args())
    gpu = mmfs_core(*[t.to(cuda_device) if isinstance(t, torch.Tensor) and t.dtype != torch.int64 else t
                      for t in p.args()])
    assert rel_l2(gpu.cpu(), cpu) <= 1e-6
