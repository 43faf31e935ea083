"""deem.models.mask_pooling: region features and the 5 region tokens (spec §10.2)."""

import pytest
import torch

from deem.models.mask_pooling import MaskPooling, binary_mask_like

pytestmark = pytest.mark.usefixtures("one_thread")


def features() -> torch.Tensor:
    """[1, 2, 4, 4]: channel 0 holds 0..15 row-major, channel 1 holds 100 + 2·(0..15)."""
    base = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    return torch.cat([base, 100 + 2 * base], dim=1)


# ------------------------------------------------------------------------------------------------
# extract / extract_region on hand-checked masks
# ------------------------------------------------------------------------------------------------


def test_extract_same_resolution():
    x = features()
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # cells 0, 1, 4, 5
    region = MaskPooling.extract_region(x, mask)
    want = torch.zeros_like(x)
    want[..., :2, :2] = x[..., :2, :2]
    assert torch.equal(region, want)
    pooled = MaskPooling.extract(x, mask)
    torch.testing.assert_close(pooled, torch.tensor([[2.5, 105.0]], dtype=torch.float64))  # mean of 0,1,4,5


def test_extract_downsamples_the_mask_bilinearly_then_binarises_at_zero():
    x = features()
    # 8x8 mask, top-left 4x4 ones -> bilinear (align_corners=False) to 4x4 samples source 2i+0.5:
    # rows/cols 0,1 fully inside -> 1; 2,3 outside -> 0: the top-left 2x2 cells
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, :4] = 1
    torch.testing.assert_close(MaskPooling.extract(x, mask), torch.tensor([[2.5, 105.0]], dtype=torch.float64))
    # one source pixel at (0, 0): output cell (0, 0) averages source (0..1, 0..1) -> 0.25 > 0, kept;
    # cell (0, 1) samples source columns 2..3 -> 0. A threshold of 0.5 would drop the region entirely.
    point = torch.zeros(1, 1, 8, 8)
    point[0, 0, 0, 0] = 1
    m = binary_mask_like(x, point)
    want = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    want[0, 0, 0, 0] = 1
    assert torch.equal(m, want)
    torch.testing.assert_close(MaskPooling.extract(x, point), torch.tensor([[0.0, 100.0]], dtype=torch.float64))
    # an off-grid pixel at (1, 2): cell (0, 1) samples source rows 0..1, cols 2..3 -> kept
    off = torch.zeros(1, 1, 8, 8)
    off[0, 0, 1, 2] = 1
    assert binary_mask_like(x, off)[0, 0].nonzero().tolist() == [[0, 1]]


def test_extract_upsamples_the_mask():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    # 2 -> 8 bilinear: output coord (i + 0.5)/4 - 0.5 < 1 for i < 6 -> weight of source 0 > 0 for i <= 5
    m = binary_mask_like(x, mask)
    want = torch.zeros(8, 8, dtype=torch.float64)
    want[:6, :6] = 1
    assert torch.equal(m[0, 0], want) and torch.equal(m[1, 0], want)
    torch.testing.assert_close(MaskPooling.extract(x, mask), x[..., :6, :6].mean(dim=(-2, -1)))


def test_empty_mask_gives_zeros():
    x = features()
    empty = torch.zeros(1, 1, 16, 16)
    assert torch.equal(MaskPooling.extract(x, empty), torch.zeros(1, 2, dtype=torch.float64))
    assert torch.equal(MaskPooling.extract_region(x, empty), torch.zeros_like(x))


def test_bool_mask_and_full_mask():
    x = torch.randn(2, 3, 5, 5)
    full = torch.ones(2, 1, 20, 20, dtype=torch.bool)
    assert torch.equal(MaskPooling.extract_region(x, full), x)
    torch.testing.assert_close(MaskPooling.extract(x, full), x.mean(dim=(-2, -1)))


def test_shape_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"mask must be \[B, 1, R, R'\] with B=2"):
        MaskPooling.extract(x, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"mask must be"):
        MaskPooling.extract(x, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"features must be \[B, C, H, W\]"):
        MaskPooling.extract_region(torch.randn(3, 4, 4), torch.ones(3, 1, 4, 4))


# ------------------------------------------------------------------------------------------------
# forward: the 5 tokens
# ------------------------------------------------------------------------------------------------


def tiny_pooling(seed: int = 0, **kw) -> MaskPooling:
    torch.manual_seed(seed)
    cfg = dict(feat_dim=6, width=5, hidden=7, mask_size=4)
    cfg.update(kw)
    return MaskPooling(**cfg).double()


def test_forward_tokens_written_out():
    mp = tiny_pooling()
    torch.manual_seed(1)
    feats = [torch.randn(2, 6, s, s, dtype=torch.float64) for s in (8, 4, 2, 1)]
    mask = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    mask[0, 0, 0, 0] = 1.0
    mask[1, 0, 1, :] = 0.5  # fractional: the shape token must see it un-binarised
    out = mp(feats, mask)
    assert out.shape == (2, 5, 5) and out.dtype == torch.float64

    lin = mp.mask_feat_linear
    for level, f in enumerate(feats):
        want = MaskPooling.extract(f, mask) @ lin.weight.t() + lin.bias
        torch.testing.assert_close(out[:, level], want, rtol=1e-12, atol=1e-12)

    # shape token: mask 2x2 -> 4x4 bilinear (align_corners=False), separable weights per axis
    # [a, b] -> [a, .75a + .25b, .25a + .75b, b]
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    resized = up @ mask[:, 0] @ up.t()  # [2, 4, 4]
    assert resized[1, 3, 0] == 0.5 and resized[1, 2, 1] == 0.375
    l0, l1, l2 = mp.mask_linear.layers
    h = torch.relu(resized.flatten(1) @ l0.weight.t() + l0.bias)
    h = torch.relu(h @ l1.weight.t() + l1.bias)
    want_shape = h @ l2.weight.t() + l2.bias  # no activation after the last layer
    torch.testing.assert_close(out[:, 4], want_shape, rtol=1e-12, atol=1e-12)


def test_forward_with_a_full_mask_pools_the_mean():
    mp = tiny_pooling(seed=2)
    feats = [torch.randn(3, 6, s, s, dtype=torch.float64) for s in (8, 4, 2, 1)]
    out = mp(feats, torch.ones(3, 1, 32, 32, dtype=torch.float64))
    for level, f in enumerate(feats):
        torch.testing.assert_close(out[:, level], mp.mask_feat_linear(f.mean(dim=(-2, -1))))


def test_forward_validation():
    mp = tiny_pooling()
    mask = torch.ones(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"multiscale_feats\[1\] must be \[B, 6, H, W\]"):
        mp([torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)], mask)
    with pytest.raises(ValueError, match="empty"):
        mp([], mask)
    plain = MaskPooling(with_tokens=False)
    assert sum(p.numel() for p in plain.parameters()) == 0
    with pytest.raises(RuntimeError, match="with_tokens=False"):
        plain([torch.randn(2, 1024, 2, 2)], mask)


def test_gradients_reach_every_parameter():
    mp = tiny_pooling().float()
    feats = [torch.randn(2, 6, s, s, requires_grad=True) for s in (8, 4)]
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 1:5] = 1
    mp(feats, mask).pow(2).sum().backward()
    for name, p in mp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    g = feats[0].grad
    assert g[..., 2:6, 1:5].abs().sum() > 0 and g[..., :2, :].abs().sum() == 0  # outside the region: no gradient


def test_7b_parameter_count_and_names_on_meta():
    with torch.device("meta"):
        mp = MaskPooling()
    n = sum(p.numel() for p in mp.parameters())
    assert n == 112 * 112 * 1024 + 1024 + 2 * (1024 * 1024 + 1024) + 1024 * 1024 + 1024
    assert round(n / 1e6, 2) == 15.99  # spec §13
    assert set(dict(mp.named_parameters())) == {
        "mask_linear.layers.0.weight",
        "mask_linear.layers.0.bias",
        "mask_linear.layers.1.weight",
        "mask_linear.layers.1.bias",
        "mask_linear.layers.2.weight",
        "mask_linear.layers.2.bias",
        "mask_feat_linear.weight",
        "mask_feat_linear.bias",
    }
