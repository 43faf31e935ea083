"""deem.models.MMFS computes the original MMFS function (spec/model.md §5) more cheaply."""

import pytest
import torch

from deem.models import MMFS
from deem.models.mmfs import image_relpos
from deem.models.mmfs_reference import OriginalMMFS
from tests.ops.helpers import rel_l2

ORIGINAL_PARAMETERS = {
    "sampling_offsets.weight", "sampling_offsets.bias", "dynamic_offset_mask.weight", "dynamic_offset_mask.bias",
    "attention_weights.weight", "attention_weights.bias", "value_proj.weight", "value_proj.bias",
    "output_proj.weight", "output_proj.bias", "query_relpos.weight", "ignore_token",
}


def build_pair(spatial=(8, 4, 2), base=4, ratio=0.5, **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, d_query=24, d_value=16, d_out=20, n_levels=len(spatial), n_heads=4, n_points=3,
               ratio=ratio, offset_init_magnitude=3, spatial_shapes=spatial, base_spatial_shape=base,
               max_num_image_per_seq=10, ignore_token_trainable=True)
    cfg.update(kw)
    ours = MMFS(**cfg).double()
    # trained-looking weights: nothing zero, ignore token non-zero
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    spec = OriginalMMFS(**cfg).double()
    spec.load_state_dict(ours.state_dict())
    return ours, spec


def inputs(N=2, Lq=7, n=3, spatial=(8, 4, 2), d_query=24, d_value=16, grid_ref=False):
    S = sum(s * s for s in spatial)
    query = torch.randn(N, Lq, d_query, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(N, n, S, d_value, dtype=torch.float64, requires_grad=True)
    if grid_ref:
        ref = torch.rand(1, Lq, 1, 2, dtype=torch.float64)
    else:
        ref = torch.full((1, Lq, 1, 2), 0.5, dtype=torch.float64)
    mask = (torch.rand(N, Lq, n) < 0.6).double()
    mask[0, 0] = 0  # sees no image
    shapes = torch.tensor([[s, s] for s in spatial] * n)
    return query, ref, feats, shapes, mask


def compare(ours, spec, query, ref, feats, shapes, mask, tol=1e-10):
    out = ours(query, ref, feats, shapes, None, mask)
    expected = spec(query, ref, feats, shapes, None, mask)
    assert rel_l2(out, expected) < tol
    g = torch.randn_like(out)
    params = [p for p in ours.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [query, feats, *params], g, allow_unused=True)
    spec_params = [dict(spec.named_parameters())[n] for n, p in ours.named_parameters() if p.requires_grad]
    expected_grads = torch.autograd.grad(expected, [query, feats, *spec_params], g, allow_unused=True)
    names = ["query", "features"] + [n for n, p in ours.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, expected_grads):
        if b is None or b.abs().max() == 0:
            assert a is None or a.abs().max() == 0, name
            continue
        assert rel_l2(a, b) < tol, f"grad {name}"


def test_parameter_names_match_the_original():
    ours, _ = build_pair()
    assert set(ours.state_dict()) == ORIGINAL_PARAMETERS


def test_llm_side_matches_original_formulation():
    ours, spec = build_pair()
    compare(ours, spec, *inputs())


def test_per_sample_mask_and_unet_like_reference_grid():
    ours, spec = build_pair(spatial=(6, 3), base=6, ratio=1.0, d_model=16)
    query, ref, feats, shapes, _ = inputs(n=1, spatial=(6, 3), grid_ref=True)
    compare(ours, spec, query, ref, feats, shapes, torch.ones(2, 1, dtype=torch.float64))


def test_incremental_decoding_uses_last_mask_row():
    ours, spec = build_pair()
    query, ref, feats, shapes, mask = inputs()
    compare(ours, spec, query[:, -1:], ref[:, -1:], feats, shapes, mask)


def test_maps_not_proportional_to_spatial_shapes_use_per_level_scaling():
    """Offsets scaled by spatial_shapes/base but divided by the actual map sizes (the original's
    SD-side configuration at 448 px): the per-level path must still match."""
    ours, spec = build_pair(spatial=(8, 4, 2), base=8)
    query, ref, feats, shapes, mask = inputs(spatial=(6, 3, 2))
    compare(ours, spec, query, ref, feats, shapes, mask)


def test_no_visible_image_gives_output_bias_plus_ignore_path():
    ours, spec = build_pair()
    query, ref, feats, shapes, mask = inputs()
    mask.zero_()
    compare(ours, spec, query, ref, feats, shapes, mask)


def test_initial_state_is_the_original_initialisation():
    torch.manual_seed(1)
    m = MMFS(d_model=64, n_levels=3, n_heads=4, n_points=2, offset_init_magnitude=3)
    assert torch.equal(m.sampling_offsets.weight, torch.zeros_like(m.sampling_offsets.weight))
    assert m.sampling_offsets.bias.abs().max() <= 3 and m.sampling_offsets.bias.abs().max() > 1
    assert torch.equal(m.attention_weights.bias, torch.zeros_like(m.attention_weights.bias))
    assert torch.equal(m.ignore_token, torch.zeros_like(m.ignore_token)) and not m.ignore_token.requires_grad


def test_original_module_with_deem_core_matches_reference_core():
    _, spec = build_pair()
    fast = OriginalMMFS(d_model=32, d_query=24, d_value=16, d_out=20,
                        n_levels=3, n_heads=4, n_points=3, ratio=0.5, spatial_shapes=(8, 4, 2), base_spatial_shape=4,
                        max_num_image_per_seq=10, ignore_token_trainable=True, core="deem").double()
    fast.load_state_dict(spec.state_dict())
    query, ref, feats, shapes, mask = inputs()
    assert rel_l2(fast(query, ref, feats, shapes, None, mask), spec(query, ref, feats, shapes, None, mask)) < 1e-10


def test_image_relpos():
    vis = torch.tensor([[[True, False, True, True]]])
    assert image_relpos(vis).tolist() == [[[3, 0, 2, 1]]]


def test_bad_inputs_are_named():
    ours, _ = build_pair()
    query, ref, feats, shapes, mask = inputs()
    with pytest.raises(ValueError, match="input_flatten has 84 rows per image"):
        ours(query, ref, feats, torch.tensor([[8, 8], [4, 4], [1, 1]] * 3), None, mask)
    with pytest.raises(ValueError, match="attention_mask must be"):
        ours(query, ref, feats, shapes, None, mask[:1])
