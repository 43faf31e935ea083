"""Bad input raises a ValueError naming the tensor and what was expected, never a crash."""

import pytest
import torch

from deem import _C
from deem._native import dl
from deem.ops import mmfs_core, ms_deform_attn
from tests.ops.helpers import mmfs_problem, msda_problem


@pytest.fixture
def p():
    return msda_problem(2, 3, 2, 8, [(3, 4), (2, 2)], 2, dtype=torch.float32)


@pytest.fixture
def q():
    return mmfs_problem(2, 3, 2, 2, 8, [(3, 4), (2, 2)], 2, dtype=torch.float32)


def call(p, **changes):
    args = dict(value=p.value, spatial_shapes=p.spatial_shapes, level_start_index=p.level_start_index,
                sampling_locations=p.sampling_locations, attention_weights=p.attention_weights)
    args.update(changes)
    return ms_deform_attn(**args)


def test_value_rank(p):
    with pytest.raises(ValueError, match=r"value: expected a 4-D tensor"):
        call(p, value=p.value[0])


def test_value_dtype(p):
    with pytest.raises(ValueError, match=r"value: expected a floating-point tensor.*int32"):
        call(p, value=p.value.to(torch.int32))


def test_non_contiguous_value(p):
    v = p.value.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match=r"value: expected a contiguous tensor"):
        call(p, value=v)


def test_shapes_disagree_with_value_length(p):
    with pytest.raises(ValueError, match=r"spatial_shapes: the levels hold 16 rows .* value has S = 17"):
        call(p, value=torch.randn(2, 17, 2, 8))


def test_level_start_index_inconsistent(p):
    with pytest.raises(ValueError, match=r"level_start_index: level 1 starts at row 11 .* hold 12 rows"):
        call(p, level_start_index=torch.tensor([0, 11]))


def test_level_start_index_length(p):
    with pytest.raises(ValueError, match=r"level_start_index: expected shape \[2\]"):
        call(p, level_start_index=torch.tensor([0]))


def test_spatial_shapes_layout(p):
    with pytest.raises(ValueError, match=r"spatial_shapes: expected shape \[L, 2\]"):
        call(p, spatial_shapes=torch.tensor([[3, 4, 1], [2, 2, 1]]))


def test_spatial_shapes_dtype(p):
    with pytest.raises(ValueError, match=r"spatial_shapes: expected an int64 or int32 tensor, got float32"):
        call(p, spatial_shapes=p.spatial_shapes.float())


def test_empty_level(p):
    with pytest.raises(ValueError, match=r"spatial_shapes: level 1 has size \(0, 2\)"):
        call(p, spatial_shapes=torch.tensor([[4, 4], [0, 2]]))


def test_too_many_levels():
    shapes = torch.ones(_C.max_levels + 1, 2, dtype=torch.int64)
    starts = torch.arange(_C.max_levels + 1)
    v = torch.randn(1, _C.max_levels + 1, 1, 4)
    loc = torch.rand(1, 1, 1, _C.max_levels + 1, 1, 2)
    w = torch.rand(1, 1, 1, _C.max_levels + 1, 1)
    with pytest.raises(ValueError, match=r"spatial_shapes: expected between 1 and 256 levels, got 257"):
        ms_deform_attn(v, shapes, starts, loc, w)


def test_location_shape(p):
    with pytest.raises(ValueError, match=r"sampling_locations: expected shape \[2, 3, 2, 2, 2, 2\]"):
        call(p, sampling_locations=p.sampling_locations[:1].contiguous())


def test_location_rank(p):
    with pytest.raises(ValueError, match=r"sampling_locations: expected a 6-D tensor"):
        call(p, sampling_locations=p.sampling_locations[..., 0])


def test_too_many_points():
    p = msda_problem(1, 2, 1, 4, [(2, 2)], 17)
    with pytest.raises(ValueError, match=r"sampling_locations: expected 1 to 16 sampling points, got 17"):
        ms_deform_attn(*p.args())


def test_weight_shape(p):
    with pytest.raises(ValueError, match=r"attention_weights: expected shape \[2, 3, 2, 2, 2\]"):
        call(p, attention_weights=p.attention_weights[..., :1].contiguous())


def test_weight_dtype(p):
    with pytest.raises(ValueError, match=r"attention_weights: expected dtype float32 or float32, got float16"):
        call(p, attention_weights=p.attention_weights.half())


def test_binding_rejects_location_dtype(p):
    out = torch.empty(2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"sampling_locations: expected dtype float32, got float64"):
        _C.msda_forward(dl(p.value), dl(p.spatial_shapes), dl(p.level_start_index),
                        dl(p.sampling_locations.double()), dl(p.attention_weights), dl(out))


def test_binding_rejects_output_shape(p):
    out = torch.empty(2, 3, 2, 7)
    with pytest.raises(ValueError, match=r"output: expected shape \[2, 3, 2, 8\]"):
        _C.msda_forward(dl(p.value), dl(p.spatial_shapes), dl(p.level_start_index), dl(p.sampling_locations),
                        dl(p.attention_weights), dl(out))


def test_binding_rejects_non_capsule(p):
    out = torch.empty(2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"value: expected a DLPack capsule"):
        _C.msda_forward(p.value, dl(p.spatial_shapes), dl(p.level_start_index), dl(p.sampling_locations),
                        dl(p.attention_weights), dl(out))


def mcall(q, **changes):
    args = dict(value=q.value, spatial_shapes=q.spatial_shapes, level_start_index=q.level_start_index,
                sampling_locations=q.sampling_locations, attention_logits=q.attention_logits,
                image_visible=q.image_visible, ignore_token=q.ignore_token)
    args.update(changes)
    return mmfs_core(**args)


def test_mmfs_value_rows_per_image(q):
    with pytest.raises(ValueError, match=r"value: expected 2 images x 16 rows .* = 32 rows"):
        mcall(q, value=torch.randn(2, 31, 2, 8))


def test_mmfs_logit_shape(q):
    with pytest.raises(ValueError, match=r"attention_logits: expected shape \[2, 3, 2, 2, 2, 2\]"):
        mcall(q, attention_logits=q.attention_logits[:, :, :, :, :1].contiguous())


def test_mmfs_visibility_shape(q):
    with pytest.raises(ValueError, match=r"image_visible: expected shape \[2, 3, 2\]"):
        mcall(q, image_visible=q.image_visible[:, :1].contiguous())


def test_mmfs_ignore_token_shape(q):
    with pytest.raises(ValueError, match=r"ignore_token: expected M\*D .* got shape \(3, 8\)"):
        mcall(q, ignore_token=torch.randn(3, 8))


def test_mmfs_binding_visibility_dtype(q):
    out, lse = torch.empty(2, 3, 2, 8), torch.empty(2, 3, 2)
    with pytest.raises(ValueError, match=r"image_visible: expected a bool or uint8 tensor, got float32"):
        _C.mmfs_forward(dl(q.value), dl(q.spatial_shapes), dl(q.level_start_index), dl(q.sampling_locations),
                        dl(q.attention_logits), dl(q.image_visible.float()), None, dl(out), dl(lse))


def test_mmfs_binding_ignore_token_shape(q):
    out, lse = torch.empty(2, 3, 2, 8), torch.empty(2, 3, 2)
    with pytest.raises(ValueError, match=r"ignore_token: expected shape \[2, 8\] \[M, D\]"):
        _C.mmfs_forward(dl(q.value), dl(q.spatial_shapes), dl(q.level_start_index), dl(q.sampling_locations),
                        dl(q.attention_logits), dl(q.image_visible), dl(torch.randn(3, 8)), dl(out), dl(lse))


@pytest.mark.cuda
def test_device_mismatch(cuda_device, p):
    with pytest.raises(ValueError, match=r"sampling_locations: expected a tensor on cuda:0 .* got cpu"):
        call(p, value=p.value.to(cuda_device), attention_weights=p.attention_weights.to(cuda_device))


@pytest.mark.cuda
def test_cuda_unsupported_head_dim(cuda_device):
    p = msda_problem(1, 2, 1, 12, [(2, 2)], 2, dtype=torch.float32, device=cuda_device)
    with pytest.raises(ValueError, match=r"value: the CUDA kernels need D = 4 x \(1, 2, 4, 8, 16 or 32\)"):
        ms_deform_attn(*p.args())
