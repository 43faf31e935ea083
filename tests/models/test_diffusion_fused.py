"""The fused masked-MSE feedback loss and the fused MMFSNet feature path (issue 16) against the unfused code."""

from __future__ import annotations

import pytest
import torch

from deem.models.diffusion import DiffusionConfig, DiffusionFeedback, MMFSNet, feedback_loss
from deem.models.diffusion.fused_features import can_fuse, fused_values
from deem.models.diffusion.losses import masked_feedback_loss

pytestmark = pytest.mark.usefixtures("one_thread")

FEAT_SIDES = (8, 4, 2, 1)


def _region_masks(B: int, H: int, g: torch.Generator) -> torch.Tensor:
    m = (torch.rand(B, 1, H, H, generator=g) > 0.5).double()
    m[0] = 0.0  # an all-zero mask
    m[1] = 1.0  # the full mask
    return m


def _spec_loss(pred, target, region_mask):
    """spec §8.5 written out in float64: mean_{b,c,y,x} l * M_b * hw / (sum M_b + 1e-8)."""
    from deem.models.diffusion.losses import latent_region_mask

    loss = (pred - target) ** 2
    B, _, h, w = loss.shape
    m = latent_region_mask(region_mask, (h, w)).double()
    return (loss * m * ((h * w) / (m.sum((1, 2, 3)) + 1e-8)).view(B, 1, 1, 1)).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_feedback_loss_matches_the_per_pixel_path(dtype):
    g = torch.Generator().manual_seed(0)
    B = 4
    pred = torch.randn(B, 4, 16, 16, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    target = torch.randn(B, 4, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    region = _region_masks(B, 32, g)
    fused = masked_feedback_loss(pred, target, region)
    (g_fused,) = torch.autograd.grad(fused, pred)
    p2 = pred.detach().double().requires_grad_()
    ref = _spec_loss(p2, target.double(), region)
    (g_ref,) = torch.autograd.grad(ref, p2)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.double(), ref, **tol)
    torch.testing.assert_close(g_fused.double(), g_ref, **tol)
    assert g_fused[0].abs().max() == 0  # the all-zero mask image: no contribution, no gradient
    # the unfused code of the feedback path (fp32 per-pixel loss, then masked), values and gradients
    p3 = pred.detach().float().requires_grad_()
    old = feedback_loss((p3 - target.float()) ** 2, region)
    (g_old,) = torch.autograd.grad(old, p3)
    torch.testing.assert_close(fused.float(), old, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_fused.float(), g_old, rtol=1e-5, atol=1e-9)
    # no region mask: the plain mean up to P / (P + 1e-8)
    plain = masked_feedback_loss(pred, target)
    torch.testing.assert_close(plain.double(), ((pred.double() - target.double()) ** 2).mean(), **tol)


def test_masked_feedback_loss_errors():
    with pytest.raises(ValueError, match="pred must be"):
        masked_feedback_loss(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="region_mask batch"):
        masked_feedback_loss(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8), torch.ones(3, 1, 16, 16))


def test_diffusion_feedback_loss_equals_per_pixel_loss():
    torch.manual_seed(0)
    model = DiffusionFeedback(DiffusionConfig.tiny())
    g = torch.Generator().manual_seed(1)
    B = 3
    images = torch.rand(B, 3, 32, 32, generator=g)
    cond = torch.randn(B, 77, 16, generator=g, requires_grad=True)
    region = _region_masks(B, 32, g)
    t = torch.tensor([10, 500, 990])
    fused = model.feedback_loss(images, cond, None, None, region, timesteps=t,
                                generator=torch.Generator().manual_seed(5))
    (g_fused,) = torch.autograd.grad(fused, cond)
    per_pixel = model.loss(images, cond, None, None, mode="feedback", timesteps=t,
                           generator=torch.Generator().manual_seed(5))
    old = feedback_loss(per_pixel, region)
    (g_old,) = torch.autograd.grad(old, cond)
    assert fused.dtype == torch.float32 and fused.dim() == 0
    torch.testing.assert_close(fused, old, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_fused, g_old, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------ fused MMFSNet


def _net(dtype=torch.float64, fused=False, **kw) -> MMFSNet:
    torch.manual_seed(0)
    net = MMFSNet([8, 16], 1, 8, feat_dim=32, attn_dim=32, num_heads=4, n_points=2, spatial_shapes=FEAT_SIDES,
                  fused_features=fused, **kw).to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking parameters: non-zero convs, non-trivial LayerNorm affines
        for n, p in net.named_parameters():
            if n.endswith(("conv.weight", "conv.bias", "norm.weight", "norm.bias", "output_proj.bias")):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return net


def _inputs(net: MMFSNet, B: int = 2, n_img: int = 2, dtype=torch.float64, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    skips = [torch.randn(B, c, s, s, generator=g, dtype=dtype) for c, s in net.layout[:-1]]
    c, s = net.layout[-1]
    mid = torch.randn(B, c, s, s, generator=g, dtype=dtype)
    feats = [torch.randn(B, n_img, 32, k, k, generator=g, dtype=dtype) for k in FEAT_SIDES]
    mask = torch.tensor([[1, 1], [1, 0]])[:B, :n_img]
    return skips, mid, feats, mask


def _run(net, skips, mid, feats, mask):
    skips = [s.clone().requires_grad_() for s in skips]
    mid = mid.clone().requires_grad_()
    feats = [f.clone().requires_grad_() for f in feats]
    net.zero_grad()
    out_skips, out_mid = net(skips, mid, feats, mask)
    g = torch.Generator().manual_seed(9)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in (*out_skips, out_mid))
    loss.backward()
    grads = [x.grad for x in (*skips, mid, *feats)]
    pgrads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    return [*out_skips, out_mid], grads, pgrads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_mmfsnet_matches_per_block_path(checkpointing):
    ref_net, fused_net = _net(), _net(fused=True)
    assert can_fuse(fused_net.blocks())
    fused_net.load_state_dict(ref_net.state_dict())  # same parameter names: checkpoints load unchanged
    assert list(ref_net.state_dict()) == list(fused_net.state_dict())
    for net in (ref_net, fused_net):
        net.train().set_gradient_checkpointing(checkpointing)
    inputs = _inputs(ref_net)
    out_a, g_a, p_a = _run(ref_net, *inputs)
    out_b, g_b, p_b = _run(fused_net, *inputs)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert p_a.keys() == p_b.keys()
    for n in p_a:
        if p_a[n] is None:
            assert p_b[n] is None or p_b[n].abs().max() == 0, n
        else:
            torch.testing.assert_close(p_b[n], p_a[n], rtol=1e-10, atol=1e-12, msg=n)
    assert any(p.abs().max() > 0 for n, p in p_a.items() if n.endswith("value_proj.weight"))


def test_fused_mmfsnet_float32_close():
    ref_net, fused_net = _net(torch.float32), _net(torch.float32, fused=True)
    inputs = _inputs(ref_net, dtype=torch.float32)
    out_a, g_a, _ = _run(ref_net, *inputs)
    out_b, g_b, _ = _run(fused_net, *inputs)
    for a, b in zip([*out_a, *g_a], [*out_b, *g_b]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_fused_values_equal_each_blocks_projection():
    net = _net()
    _, _, feats, _ = _inputs(net)
    from deem.models.diffusion.mmfs_net import pack_mmfs_features

    flat = pack_mmfs_features(feats).flat
    values = fused_values(net.blocks(), flat)
    N, n_img, S, _ = flat.shape
    for k, b in enumerate(net.blocks()):
        ref = b.mmfs.project_values(b.feat_norm(flat)).reshape(N * n_img * S, -1)
        torch.testing.assert_close(values[k], ref, rtol=1e-12, atol=1e-12)


def test_fused_mmfsnet_gradcheck_tiny():
    torch.manual_seed(0)
    net = MMFSNet([4], 1, 2, feat_dim=4, attn_dim=4, num_heads=2, n_points=1, n_levels=2, spatial_shapes=(2, 1),
                  fused_features=True).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    skips = [torch.randn(1, c, s, s, generator=g, dtype=torch.float64, requires_grad=True) for c, s in net.layout[:-1]]
    c, s = net.layout[-1]
    mid = torch.randn(1, c, s, s, generator=g, dtype=torch.float64, requires_grad=True)
    f0 = torch.randn(1, 1, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    f1 = torch.randn(1, 1, 4, 1, 1, generator=g, dtype=torch.float64, requires_grad=True)
    weights = [net.mmfs_down_blocks[0].feat_norm.weight, net.mmfs_mid_block.mmfs.value_proj.weight,
               net.mmfs_down_blocks[0].conv.weight]

    def fn(*xs):
        n = len(skips)
        out_skips, out_mid = net(list(xs[:n]), xs[n], [xs[n + 1], xs[n + 2]])
        return (*out_skips, out_mid)

    # the sampling offsets are large enough that no location sits on a cell edge (bilinear kinks)
    assert torch.autograd.gradcheck(fn, (*skips, mid, f0, f1), eps=1e-6, atol=1e-5)
    assert all(w.requires_grad for w in weights)
    out = fn(*skips, mid, f0, f1)
    sum(o.sum() for o in out).backward()
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in weights)


def test_fused_flag_reaches_the_mmfsnet_and_gives_the_same_unet_output():
    torch.manual_seed(0)
    a = DiffusionFeedback(DiffusionConfig.tiny())
    b = DiffusionFeedback(DiffusionConfig.tiny(mmfs_fused_features=True))
    assert b.mmfs_module.fused_features and not a.mmfs_module.fused_features
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in a.mmfs_module.blocks():
            blk.conv.weight.normal_(generator=g)
    b.load_state_dict(a.state_dict())
    images = torch.rand(2, 3, 32, 32, generator=g)
    cond = torch.randn(2, 77, 16, generator=g)
    feats = [torch.randn(2, 1, 32, k, k, generator=g) for k in FEAT_SIDES]
    la = a.feedback_loss(images, cond, feats, torch.ones(2, 1), timesteps=torch.tensor([100, 700]),
                         generator=torch.Generator().manual_seed(3))
    lb = b.feedback_loss(images, cond, feats, torch.ones(2, 1), timesteps=torch.tensor([100, 700]),
                         generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_mmfsnet_cuda(dtype):
    ref_net, fused_net = _net(fused=False).cuda().to(dtype), _net(fused=True).cuda().to(dtype)
    skips, mid, feats, mask = _inputs(ref_net)
    inputs = ([s.cuda().to(dtype) for s in skips], mid.cuda().to(dtype), [f.cuda().to(dtype) for f in feats],
              mask.cuda())
    out_a, g_a, _ = _run(ref_net, *inputs)
    out_b, g_b, _ = _run(fused_net, *inputs)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip([*out_a, *g_a], [*out_b, *g_b]):
        torch.testing.assert_close(b.float(), a.float(), **tol)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_masked_feedback_loss_cuda():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 4, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randn(4, 4, 16, 16, generator=g, dtype=torch.float64)
    region = _region_masks(4, 32, g)
    ref = _spec_loss(pred, target, region)
    p = pred.cuda().requires_grad_()
    out = masked_feedback_loss(p, target.cuda(), region.cuda())
    out.backward()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-14)
    assert p.grad[0].abs().max() == 0
