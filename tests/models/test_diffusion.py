"""Diffusion side (spec/model.md §8, §9.3-9.4): run_unet vs diffusers, MMFSNet, losses, loading, generation."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from deem.models.diffusion import (
    SD21_BASE_UNET_CONFIG,
    DiffusionConfig,
    DiffusionFeedback,
    MMFSFeatures,
    MMFSNet,
    feedback_loss,
    generation_loss,
    mmfs_block_layout,
    negative_prompt_embedding,
    pack_mmfs_features,
    remap_feedback_timesteps,
    run_unet,
    sample_images,
)

FEAT_SIDES = (8, 4, 2, 1)  # DiffusionConfig.tiny(): a 32 px image encoder


def tiny_unet(**kw) -> UNet2DConditionModel:
    cfg = dict(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=2,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval()


def features(B: int, n: int = 1, C: int = 32, sides=FEAT_SIDES, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, C, s, s, generator=g).requires_grad_(grad) for s in sides]


def perturb_convs(mmfs: MMFSNet, scale: float = 0.2, seed: int = 1) -> None:
    """Give the zero-initialised output convs trained-looking weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in mmfs.blocks():
            blk.conv.weight.copy_(torch.randn(blk.conv.weight.shape, generator=g) * scale)
            blk.conv.bias.copy_(torch.randn(blk.conv.bias.shape, generator=g) * scale)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model() -> DiffusionFeedback:
    torch.manual_seed(0)
    return DiffusionFeedback(DiffusionConfig.tiny())


# ------------------------------------------------------------------------------------------------
# run_unet
# ------------------------------------------------------------------------------------------------

UNET_VARIANTS = {
    "brief": {},
    # mid block with cross-attention, 2 layers per block, 3 levels (two downsamplers)
    "three_levels": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
}


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
@pytest.mark.parametrize("side", [8, 9])  # 9: odd sizes take the forced-upsample-size path
def test_run_unet_equals_diffusers_forward(variant, side):
    unet = tiny_unet(**UNET_VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, side, side, generator=g)
    ehs = torch.randn(3, 5, 16, generator=g)
    for t in (torch.tensor([1, 500, 999]), torch.tensor(37), 421):
        with torch.no_grad():
            expected = unet(x, t, ehs).sample
            got = run_unet(unet, x, t, ehs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_run_unet_with_zero_init_mmfs_is_unchanged():
    unet = tiny_unet()
    mmfs = MMFSNet.for_unet(unet.config, latent_size=8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES)
    g = torch.Generator().manual_seed(2)
    x, ehs, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        expected = unet(x, t, ehs).sample
        got = run_unet(unet, x, t, ehs, mmfs, features(2), torch.ones(2, 1))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_mmfs_residuals_enter_where_controlnet_residuals_do():
    """The MMFS residuals, fed to diffusers' own forward as ControlNet residuals, give the same
    prediction: they are added to the skips and the mid-block output after the mid block."""
    unet = tiny_unet(**UNET_VARIANTS["three_levels"])
    mmfs = MMFSNet.for_unet(unet.config, latent_size=8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES)
    perturb_convs(mmfs)
    seen = {}

    def hook(module, args, output):
        seen["res"] = tuple(new - old for new, old in zip(output[0], args[0]))
        seen["mid"] = output[1] - args[1]

    mmfs.register_forward_hook(hook)
    g = torch.Generator().manual_seed(3)
    x, ehs, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        got = run_unet(unet, x, t, ehs, mmfs, features(2), torch.ones(2, 1))
        plain = unet(x, t, ehs).sample
        expected = unet(
            x, t, ehs, down_block_additional_residuals=seen["res"], mid_block_additional_residual=seen["mid"]
        ).sample
    assert len(seen["res"]) == len(mmfs.mmfs_down_blocks) == 9
    assert all(r.abs().max() > 0 for r in seen["res"])
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_run_unet_rejects_unsupported_unet():
    unet = tiny_unet(class_embed_type="timestep")
    with pytest.raises(ValueError, match="class_embed_type"):
        run_unet(unet, torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 5, 16))


# ------------------------------------------------------------------------------------------------
# MMFSNet
# ------------------------------------------------------------------------------------------------


def test_sd21_mmfsnet_layout_and_parameter_counts():
    """Spec §8.2 table and §13 counts, built on the meta device (no memory)."""
    with torch.device("meta"):
        m = DiffusionFeedback(DiffusionConfig.sd21_base())
    net = m.mmfs_module
    assert len(net.mmfs_down_blocks) == 12 and len(net.blocks()) == 13
    assert [b.query_dim for b in net.blocks()] == [320] * 4 + [640] * 3 + [1280] * 6
    assert [b.base_spatial_shape for b in net.blocks()] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4
    for b in net.blocks():
        assert b.feat_dim == 1024 and b.pos_embed.shape == (64 * 64, b.query_dim)
        assert (b.mmfs.n_heads, b.mmfs.n_points, b.mmfs.n_levels, b.mmfs.d_inner) == (16, 8, 4, 1024)
        assert b.mmfs.max_num_image_per_seq == 10 and b.mmfs.offset_init_magnitude == 1
        assert b.mmfs.scale_ratios == tuple(s / b.base_spatial_shape for s in (64, 32, 16, 8))

    def count(module, pred=lambda n, p: True):
        return sum(p.numel() for n, p in module.named_parameters() if pred(n, p))

    assert count(net, lambda n, p: p.requires_grad) == 56_976_320  # 56.98M
    assert count(net, lambda n, p: n.endswith("pos_embed")) == 44_564_480  # 44.56M
    assert count(net, lambda n, p: n.endswith("ignore_token")) == 13 * 1024
    assert count(net) == 56_976_320 + 44_564_480 + 13 * 1024
    assert count(m.unet) == 865_910_724 and count(m.vae) == 83_653_863  # published SD-2.1 counts
    assert count(m.unet, lambda n, p: p.requires_grad) == 0 and count(m.vae, lambda n, p: p.requires_grad) == 0
    # 448 px image encoder: offsets scaled for the actual 112/56/28/14 maps (spec §14 bug 7)
    with torch.device("meta"):
        net448 = MMFSNet.for_unet(SD21_BASE_UNET_CONFIG, 64, spatial_shapes=(112, 56, 28, 14))
    assert net448.blocks()[3].mmfs.scale_ratios == (112 / 32, 56 / 32, 28 / 32, 14 / 32)
    assert DiffusionConfig.sd21_base(encoder_image_size=448).mmfs_spatial_shapes == (112, 56, 28, 14)


def test_block_layout_follows_the_unet():
    assert mmfs_block_layout([8, 16], 1, 16) == ([(8, 16), (8, 16), (8, 8), (16, 8)], (16, 8))
    assert mmfs_block_layout([4, 8, 8], [1, 2, 1], 9) == (
        [(4, 9), (4, 9), (4, 5), (8, 5), (8, 5), (8, 3), (8, 3)],
        (8, 3),
    )


def test_mmfsnet_zero_init_is_exact_noop_and_learns():
    torch.manual_seed(0)
    net = MMFSNet([8, 16], 1, 8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES)
    layout = net.layout
    g = torch.Generator().manual_seed(4)
    skips = [torch.randn(2, c, s, s, generator=g) for c, s in layout[:-1]]
    mid = torch.randn(2, *[layout[-1][0]], layout[-1][1], layout[-1][1], generator=g)
    feats = features(2)
    new_skips, new_mid = net(skips, mid, feats, torch.ones(2, 1))
    assert all(torch.equal(a, b) for a, b in zip(new_skips, skips)) and torch.equal(new_mid, mid)

    out = sum((s * torch.randn(s.shape, generator=g)).sum() for s in (*new_skips, new_mid))
    out.backward()
    for name, p in net.named_parameters():
        if name.endswith("conv.weight"):
            assert p.grad is not None and p.grad.abs().max() > 0, name
        elif p.requires_grad and "conv" not in name:  # zero conv: nothing upstream learns at step 0
            assert p.grad is None or p.grad.abs().max() == 0, name
        if not p.requires_grad:
            assert name.endswith(("pos_embed", "ignore_token")) and p.grad is None
    torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1).step()
    new_skips, new_mid = net(skips, mid, feats, torch.ones(2, 1))
    assert all((a - b).abs().max() > 0 for a, b in zip(new_skips, skips)) and (new_mid - mid).abs().max() > 0


def test_mmfsblock_queries_positions_and_masking():
    torch.manual_seed(0)
    net = MMFSNet([8, 16], 1, 8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES)
    perturb_convs(net)
    blk = net.mmfs_down_blocks[2]  # 8 channels at side 4: pos table resized 8x8 -> 4x4
    assert blk.pos_embed.shape == (64, 8)
    packed = pack_mmfs_features(features(2, n=2))
    assert packed.flat.shape == (2, 2, 64 + 16 + 4 + 1, 32)
    assert packed.spatial_shapes == ((8, 8), (4, 4), (2, 2), (1, 1))
    torch.testing.assert_close(packed.flat[:, :, 64:80], features(2, n=2)[1].flatten(3).transpose(2, 3))
    # list and packed inputs give the same result
    skips = [torch.randn(2, c, s, s) for c, s in net.layout[:-1]]
    mid = torch.randn(2, 16, 4, 4)
    a = net(skips, mid, features(2, n=2), torch.ones(2, 2))
    b = net(skips, mid, packed, torch.ones(2, 2))
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    x = torch.randn(2, 8, 4, 4)
    # a fully masked image set: every query puts its mass on the null slot -> conv(output_proj.bias)
    with torch.no_grad():
        blk.mmfs.output_proj.bias.normal_()
    res = blk(x, packed, torch.zeros(2, 2))
    expected = blk.conv(blk.mmfs.output_proj.bias.view(1, 8, 1, 1)).expand_as(res)
    torch.testing.assert_close(res, expected, rtol=1e-4, atol=1e-4)
    # invisible images are ignored: changing them changes nothing
    other = MMFSFeatures(packed.flat.clone(), packed.spatial_shapes)
    other.flat[:, 1] += 5.0
    mask = torch.tensor([[1, 0], [1, 0]])
    torch.testing.assert_close(blk(x, packed, mask), blk(x, other, mask))


def test_mmfsnet_gradient_checkpointing_same_result():
    torch.manual_seed(0)
    net = MMFSNet([8, 16], 1, 8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES).train()
    perturb_convs(net)
    layout = net.layout
    skips = [torch.randn(1, c, s, s) for c, s in layout[:-1]]
    mid = torch.randn(1, layout[-1][0], layout[-1][1], layout[-1][1])
    grads = []
    for ckpt in (False, True):
        net.set_gradient_checkpointing(ckpt)
        net.zero_grad()
        feats = features(1, grad=True)
        new_skips, new_mid = net(skips, mid, feats)
        (sum(s.square().sum() for s in new_skips) + new_mid.square().sum()).backward()
        grads.append([f.grad for f in feats] + [p.grad.clone() for p in net.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_mmfsnet_input_errors():
    net = MMFSNet([8, 16], 1, 8, feat_dim=32, attn_dim=32, spatial_shapes=FEAT_SIDES)
    skips = [torch.zeros(1, c, s, s) for c, s in net.layout[:-1]]
    mid = torch.zeros(1, 16, 4, 4)
    with pytest.raises(ValueError, match="sides"):
        net(skips, mid, features(1, sides=(16, 8, 4, 2)))
    with pytest.raises(ValueError, match="feat_dim=32"):
        net(skips, mid, features(1, C=24))
    with pytest.raises(ValueError, match="mmfs_mask"):
        net(skips, mid, features(1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="skip tensors"):
        net(skips[:-1], mid, features(1))
    with pytest.raises(ValueError, match=r"\[B, n_img, C, H, W\]"):
        pack_mmfs_features([torch.zeros(1, 32, 8, 8)])


# ------------------------------------------------------------------------------------------------
# Timestep remap and loss reductions
# ------------------------------------------------------------------------------------------------


def test_encoder_timestep_remap():
    t = torch.arange(1000)
    got = remap_feedback_timesteps(t)
    # exact rational rounding (no ties exist for integer t) ...
    exact = torch.tensor([round(Fraction(3 * (i - 500), 5) + 500) for i in range(1000)])
    assert torch.equal(got, exact)
    # ... and the original's float32 arithmetic agrees for every integer timestep
    assert torch.equal(got, torch.round((t - 500) * 0.6 + 500).long())
    assert got.min() == 200 and got.max() == 799 and got.dtype == torch.int64
    assert remap_feedback_timesteps(torch.tensor([0, 1, 2, 3, 500, 998, 999])).tolist() == [
        200,
        201,
        201,
        202,
        500,
        799,
        799,
    ]
    # fractional timesteps hit exact .5 values: round half to even
    half = remap_feedback_timesteps(torch.tensor([502.5, 507.5, 512.5, 497.5, 492.5]))
    assert half.tolist() == [502, 504, 508, 498, 496]  # 501.5, 504.5, 507.5, 498.5, 495.5


def test_feedback_loss_hand_example():
    B, C = 2, 3
    loss = torch.full((B, C, 4, 4), 100.0)  # outside the region: must not count
    loss[0, :, :2, :2] = 1.0
    loss[1, :, 0, 0] = 2.0
    mask = torch.zeros(B, 1, 8, 8)
    mask[0, :, :4, :4] = 1  # -> latent top-left 2x2 quadrant
    mask[1, :, 0, 0] = 1  # one pixel: bilinear 0.25 > 0 -> latent cell (0, 0)
    # per image: masked mean (1, 2); mean over images 1.5
    assert feedback_loss(loss, mask).item() == pytest.approx(1.5, rel=1e-6)
    # the formula of the original, written out: mean(ℓ · M · 16 / ΣM)
    M = torch.zeros(B, 1, 4, 4)
    M[0, :, :2, :2] = 1
    M[1, :, 0, 0] = 1
    expected = (loss * M * (16 / M.sum((1, 2, 3))).view(B, 1, 1, 1)).mean()
    torch.testing.assert_close(feedback_loss(loss, mask), expected)
    # full mask: the plain mean; empty mask: that image contributes 0, no NaN
    assert feedback_loss(loss, torch.ones(B, 1, 8, 8)).item() == pytest.approx(loss.mean().item(), rel=1e-6)
    assert feedback_loss(loss).item() == pytest.approx(loss.mean().item())
    empty = mask.clone()
    empty[1] = 0
    assert feedback_loss(loss, empty).item() == pytest.approx(0.5, rel=1e-6)


def test_generation_loss_averages_over_the_trained_images_only():
    loss = torch.ones(4, 2, 3, 3) * torch.tensor([1.0, 5.0, 3.0, 7.0]).view(4, 1, 1, 1)
    # masked-out images do not dilute the mean (the original's mean over all images would give 1.0)
    assert generation_loss(loss, torch.tensor([1.0, 0.0, 1.0, 0.0])).item() == pytest.approx(2.0)
    assert generation_loss(loss, torch.ones(4)).item() == pytest.approx(4.0)
    assert generation_loss(loss, torch.zeros(4)).item() == 0.0
    with pytest.raises(ValueError, match="sample_mask"):
        generation_loss(loss, torch.ones(3))


# ------------------------------------------------------------------------------------------------
# DiffusionFeedback: training loss
# ------------------------------------------------------------------------------------------------


def test_loss_shapes_and_gradient_flow(model):
    model.train()
    B = 2
    images = torch.rand(B, 3, 32, 32)
    before = images.clone()
    cond = torch.randn(B, 77, 16, requires_grad=True)
    feats = features(B, grad=True)
    loss = model.loss(images, cond, feats, torch.ones(B, 1), generator=torch.Generator().manual_seed(0))
    assert loss.shape == (B, 4, 16, 16) and loss.dtype == torch.float32 and torch.isfinite(loss).all()
    assert torch.equal(images, before)  # normalised out of place (spec §14 bug 1)
    feedback_loss(loss).backward()
    assert cond.grad is not None and cond.grad.abs().max() > 0
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    convs = [p for n, p in model.mmfs_module.named_parameters() if n.endswith("conv.weight")]
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in convs)

    # once the convs are non-zero, the features (hence the image encoder) receive gradients too
    perturb_convs(model.mmfs_module)
    model.zero_grad()
    feats = features(B, grad=True)
    loss = model.loss(images, cond.detach(), feats, torch.ones(B, 1), generator=torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert all(f.grad is not None and f.grad.abs().max() > 0 for f in feats)
    offsets = model.mmfs_module.mmfs_down_blocks[0].mmfs.sampling_offsets.weight
    assert offsets.grad is not None and offsets.grad.abs().max() > 0


def test_unet_trainable_flag():
    m = DiffusionFeedback(DiffusionConfig.tiny())
    m.set_trainable(freeze_unet=False)
    assert all(p.requires_grad for p in m.unet.parameters())
    assert not any(p.requires_grad for p in m.vae.parameters())
    frozen = {n for n, p in m.mmfs_module.named_parameters() if not p.requires_grad}
    assert frozen and all(n.endswith(("pos_embed", "ignore_token")) for n in frozen)
    loss = m.loss(
        torch.rand(1, 3, 32, 32), torch.randn(1, 7, 16), mode="generation", generator=torch.Generator().manual_seed(0)
    )
    loss.mean().backward()
    assert m.unet.conv_out.weight.grad.abs().max() > 0
    m.set_trainable(freeze_unet=True)
    assert not any(p.requires_grad for p in m.unet.parameters())


@pytest.mark.parametrize("mode", ["feedback", "generation"])
def test_loss_noising_timesteps_and_target(model, mode):
    """The UNet sees sqrt(ᾱ_t) z0 + sqrt(1-ᾱ_t) ε at the (remapped) t, and the loss is (ε̂ - ε)²."""
    model.eval()
    seen = {}
    model.unet.conv_in.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    model.unet.time_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("t", args[0]))
    model.unet.conv_out.register_forward_hook(lambda mod, args, out: seen.__setitem__("pred", out))
    images, cond = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 16)
    t = torch.tensor([1, 999])
    with torch.no_grad():
        loss = model.loss(images, cond, features(2), mode=mode, timesteps=t, generator=torch.Generator().manual_seed(5))
    # replay the generator: posterior samples first, then the noise
    g = torch.Generator().manual_seed(5)
    z0 = model.encode_latents(images, g)
    noise = randn_tensor(z0.shape, generator=g, dtype=torch.float32)
    t_used = torch.tensor([201, 799]) if mode == "feedback" else t
    assert torch.equal(seen["t"], t_used)
    expected_x = DDPMScheduler.from_config(model.scheduler.config).add_noise(z0, noise, t_used)
    torch.testing.assert_close(seen["x"], expected_x)
    torch.testing.assert_close(loss, (seen["pred"] - noise) ** 2)


def test_loss_deterministic_and_input_errors(model):
    images, cond = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 16)
    with torch.no_grad():
        a = model.loss(images, cond, features(2), generator=torch.Generator().manual_seed(9))
        b = model.loss(images, cond, features(2), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\]"):
        model.loss(torch.rand(2, 3, 64, 64), cond)
    with pytest.raises(ValueError, match="cond must be"):
        model.loss(images, torch.randn(2, 77, 8))
    with pytest.raises(ValueError, match="mode"):
        model.loss(images, cond, mode="encoder")
    with pytest.raises(ValueError, match="timesteps"):
        model.loss(images, cond, timesteps=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="mmfs_features has batch 3"):
        model.loss(images, cond, features(3))


def test_vae_stays_fp32_under_dtype_casts(model):
    model.to(torch.bfloat16)
    assert model.unet.dtype == torch.bfloat16
    assert next(model.mmfs_module.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    model.half()
    assert model.unet.dtype == torch.float16 and all(p.dtype == torch.float32 for p in model.vae.parameters())
    lat = model.encode_latents(torch.rand(1, 3, 32, 32))
    assert lat.dtype == torch.float32 and lat.shape == (1, 4, 16, 16)
    model.float()
    assert model.unet.dtype == torch.float32


def test_meta_construction_then_state_dict_load(model):
    """Built on the meta device, materialised with to_empty and loaded from a state dict, the model
    computes what the original does; reset_parameters restores the frozen sin-cos tables."""
    with torch.device("meta"):
        meta = DiffusionFeedback(DiffusionConfig.tiny())
    assert meta.unet.conv_in.weight.is_meta and not meta.alphas_cumprod.is_meta
    meta.to_empty(device="cpu")
    meta.mmfs_module.reset_parameters()
    ref_pos = {n: p for n, p in model.mmfs_module.named_parameters() if n.endswith("pos_embed")}
    assert all(torch.equal(p, ref_pos[n]) for n, p in meta.mmfs_module.named_parameters() if n.endswith("pos_embed"))
    missing, unexpected = meta.load_state_dict(model.state_dict())
    assert not missing and not unexpected
    images, cond = torch.rand(1, 3, 32, 32), torch.randn(1, 77, 16)
    with torch.no_grad():
        a = model.loss(images, cond, features(1), generator=torch.Generator().manual_seed(0))
        b = meta.loss(images, cond, features(1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Loading a diffusers directory
# ------------------------------------------------------------------------------------------------

TINY_MMFS = dict(image_size=32, mmfs_feature_dim=32, mmfs_attn_dim=32, mmfs_spatial_shapes=FEAT_SIDES)


def save_sd_dir(model: DiffusionFeedback, path) -> None:
    model.unet.save_pretrained(path / "unet")
    model.vae.save_pretrained(path / "vae")
    # SD-2.1 ships a PNDM scheduler config, which DEEM reads as DDPM
    PNDMScheduler.from_config(model.scheduler.config, skip_prk_steps=True).save_pretrained(path / "scheduler")


def test_load_saved_diffusers_directory(model, tmp_path):
    save_sd_dir(model, tmp_path)
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiffusionFeedback(DiffusionConfig.sd21_base(tmp_path, **TINY_MMFS))
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert loaded.scheduler.config.timestep_spacing == "leading" and loaded.scheduler.config.steps_offset == 1
    for name in ("unet", "vae"):
        ours, theirs = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(p.dtype == torch.float32 for p in loaded.vae.parameters())
    loaded.mmfs_module.load_state_dict(model.mmfs_module.state_dict())
    images, cond = torch.rand(1, 3, 32, 32), torch.randn(1, 77, 16)
    with torch.no_grad():
        a = model.loss(images, cond, features(1), generator=torch.Generator().manual_seed(0))
        b = loaded.loss(images, cond, features(1), generator=torch.Generator().manual_seed(0))
    # same weights; safetensors-loaded tensors may take other SIMD paths: agreement to rounding
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert DiffusionFeedback.from_pretrained(tmp_path, **TINY_MMFS).latent_size == 16


def test_load_errors_name_the_missing_file(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusionFeedback(DiffusionConfig.sd21_base(tmp_path / "nope", **TINY_MMFS))
    save_sd_dir(model, tmp_path)
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/config\.json"):
        DiffusionFeedback(DiffusionConfig.sd21_base(tmp_path, **TINY_MMFS))
    model.vae.save_pretrained(tmp_path / "vae")
    unet_dir = tmp_path / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"unet/diffusion_pytorch_model\.safetensors.*pickled"):
        DiffusionFeedback(DiffusionConfig.sd21_base(tmp_path, **TINY_MMFS))
    with pytest.raises(ValueError, match="either pretrained_path or"):
        DiffusionConfig(pretrained_path=str(tmp_path), unet_config={})


def test_negative_prompt_embedding_from_text_encoder(tmp_path):
    """The empty prompt as SD-2.1 tokenises it (<bos> <eos> then "!" padding to 77), through the
    text encoder, last_hidden_state."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with pytest.raises(FileNotFoundError, match=r"tokenizer/tokenizer_config\.json"):
        negative_prompt_embedding(tmp_path)
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "b</w>": 4}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (tok / "tokenizer_config.json").write_text(json.dumps(dict(model_max_length=77, pad_token="!", **special)))
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2)
    encoder = CLIPTextModel(cfg).eval()
    encoder.save_pretrained(tmp_path / "text_encoder")
    emb = negative_prompt_embedding(tmp_path)
    assert emb.shape == (1, 77, 16) and emb.dtype == torch.float32 and not emb.requires_grad
    ids = torch.tensor([[0, 1] + [2] * 75])
    with torch.no_grad():
        expected = encoder(ids).last_hidden_state
    torch.testing.assert_close(emb, expected)
    other = negative_prompt_embedding(tmp_path, prompt="a b")
    assert (other - emb).abs().max() > 0


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def test_generate_shapes_range_determinism_and_cfg(model):
    model.eval()
    perturb_convs(model.mmfs_module)
    B = 2
    g = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(B, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    feats, mask = features(B), torch.ones(B, 1, dtype=torch.long)
    kw = dict(num_inference_steps=4)

    seen = []
    handle = model.mmfs_module.mmfs_mid_block.register_forward_hook(
        lambda mod, args, out: seen.append((args[1].flat, args[2]))
    )
    steps = []
    t_handle = model.unet.time_proj.register_forward_pre_hook(lambda mod, args: steps.append(args[0][0].item()))
    out = sample_images(model, cond, neg, feats, mask, guidance_scale=3.5,
                        generator=torch.Generator().manual_seed(1), **kw)
    handle.remove()
    t_handle.remove()
    assert out.shape == (B, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    assert steps == [751, 501, 251, 1]  # "leading" spacing with steps_offset 1
    assert model.scheduler.num_inference_steps is None  # the model's scheduler is not mutated
    # CFG: both halves see the same visual context
    flat, m = seen[0]
    assert flat.shape[0] == 2 * B and torch.equal(flat[:B], flat[B:]) and torch.equal(m[:B], m[B:])

    again = sample_images(model, cond, neg, feats, mask, guidance_scale=3.5,
                        generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out, again)
    other_seed = sample_images(model, cond, neg, feats, mask, generator=torch.Generator().manual_seed(2), **kw)
    assert (other_seed - out).abs().max() > 1e-3

    # guidance 1.0 reduces to the conditional prediction
    cfg1 = sample_images(model, cond, neg, feats, mask, guidance_scale=1.0,
                         generator=torch.Generator().manual_seed(1), **kw)
    cond_only = sample_images(model, cond, None, feats, mask, generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(cfg1, cond_only, rtol=0, atol=1e-4)
    assert (cfg1 - out).abs().max() > 1e-3  # and guidance 3.5 does use the negative branch

    # mini-batches of one: the first image starts from the same latents, the shapes hold
    model.config.generation_batch_size = 1
    small = sample_images(model, cond, neg, feats, mask, generator=torch.Generator().manual_seed(1), **kw)
    assert small.shape == out.shape and small.min() >= 0 and small.max() <= 1

    with pytest.raises(ValueError, match="negative_cond"):
        sample_images(model, cond, torch.randn(3, 77, 16), **kw)
