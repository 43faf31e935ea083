"""deem.models.vision: the ConvNeXt image encoder, its sin-cos positions and open_clip loading (spec §2)."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.convnext import ConvNeXt

from deem.models.vision import (
    CLIP_MEAN,
    CLIP_STD,
    ImageEncoder,
    ImageEncoderConfig,
    get_abs_pos,
    load_open_clip_convnext,
    sincos_pos_embed_2d,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def tiny_encoder(seed: int = 0, image_size: int = 256, **kw) -> ImageEncoder:
    torch.manual_seed(seed)
    return ImageEncoder(ImageEncoderConfig.tiny(image_size=image_size, **kw))


def set_layer_scale(module: torch.nn.Module, value: float = 1.0) -> None:
    """Residual branches start at 1e-6 (timm's layer scale); make them count in comparisons."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.fill_(value)


def table_to_image(table: torch.Tensor, g: int) -> torch.Tensor:
    """[g*g, D] row-major -> [1, D, g, g], written with explicit indices."""
    d = table.shape[1]
    img = torch.empty(1, d, g, g, dtype=table.dtype)
    for r in range(g):
        for c in range(g):
            img[0, :, r, c] = table[r * g + c]
    return img


def open_clip_state_dict(trunk: ConvNeXt) -> dict[str, torch.Tensor]:
    """A state dict laid out like open_clip's ``open_clip_pytorch_model.bin`` for a timm ConvNeXt tower."""
    sd = {f"visual.trunk.{k}": v.clone() for k, v in trunk.state_dict().items()}
    width = trunk.num_features
    sd["visual.head.proj.weight"] = torch.randn(6, width)
    sd["token_embedding.weight"] = torch.randn(10, 6)
    sd["positional_embedding"] = torch.randn(4, 6)
    sd["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(18, 6)
    sd["ln_final.weight"] = torch.ones(6)
    sd["text_projection"] = torch.randn(6, 6)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def source_trunk(seed: int = 1, dims=(8, 16, 32, 64)) -> ConvNeXt:
    torch.manual_seed(seed)
    t = ConvNeXt(num_classes=0, depths=(1, 1, 1, 1), dims=dims, norm_eps=1e-6)
    with torch.no_grad():  # every tensor distinct from a fresh init
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return t


class NotATensor:
    """Pickled into a .bin so weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.x = 1


# ------------------------------------------------------------------------------------------------
# positions
# ------------------------------------------------------------------------------------------------


def test_sincos_table_matches_formula_row_code_first():
    dim, g = 16, 3
    table = sincos_pos_embed_2d(dim, g, cls_token=True)
    assert table.shape == (1 + g * g, dim) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(dim))
    half, quarter = dim // 2, dim // 4
    for r in range(g):
        for c in range(g):
            row = table[1 + r * g + c]
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                expected = [
                    (k, math.sin(r * w)),
                    (quarter + k, math.cos(r * w)),
                    (half + k, math.sin(c * w)),
                    (half + quarter + k, math.cos(c * w)),
                ]
                for idx, val in expected:
                    assert row[idx].item() == pytest.approx(val, abs=1e-6), (r, c, idx)
    no_cls = sincos_pos_embed_2d(dim, g, cls_token=False)
    assert torch.equal(no_cls, table[1:])


def test_sincos_table_7b_shape_and_validation():
    t = sincos_pos_embed_2d(1024, 16, cls_token=True)
    assert t.shape == (257, 1024)
    # cell (row 1, col 0): first half encodes the row, so it differs from cell (0, 1)
    assert not torch.allclose(t[1 + 16], t[1 + 1])
    assert torch.allclose(t[1 + 16, :512], t[1 + 16 + 5, :512])  # same row, other column
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 4)


def test_get_abs_pos_identity_returns_table():
    table = torch.randn(1 + 16 * 16, 8)
    assert get_abs_pos(table, 257) is table
    grid = torch.randn(64, 8)
    assert get_abs_pos(grid, 64) is grid


@pytest.mark.parametrize("cls", [True, False])
def test_get_abs_pos_resizes_grid_bicubic_and_keeps_cls(cls):
    torch.manual_seed(0)
    g, t, d = 4, 7, 5
    grid = torch.randn(g * g, d, dtype=torch.float64)
    table = torch.cat([torch.randn(1, d, dtype=torch.float64), grid]) if cls else grid
    out = get_abs_pos(table, t * t + (1 if cls else 0))
    assert out.dtype == torch.float64 and out.shape == (t * t + (1 if cls else 0), d)
    want = F.interpolate(table_to_image(grid, g).float(), size=(t, t), mode="bicubic", align_corners=False)
    got_grid = out[1:] if cls else out
    for r in range(t):
        for c in range(t):
            torch.testing.assert_close(got_grid[r * t + c], want[0, :, r, c].double(), rtol=0, atol=1e-6)
    if cls:
        assert torch.equal(out[0], table[0])


def test_get_abs_pos_downsizes_and_rejects_bad_sizes():
    table = sincos_pos_embed_2d(8, 16, cls_token=True)
    assert get_abs_pos(table, 1 + 8 * 8).shape == (65, 8)
    with pytest.raises(ValueError, match="1 \\+ a square"):
        get_abs_pos(table, 256)
    with pytest.raises(ValueError, match="a square"):
        get_abs_pos(table[1:], 257)
    with pytest.raises(ValueError, match="neither a square"):
        get_abs_pos(torch.zeros(7, 8), 9)
    with pytest.raises(ValueError, match="\\[rows, dim\\]"):
        get_abs_pos(torch.zeros(1, 257, 8), 257)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def test_config_presets_and_validation():
    base = ImageEncoderConfig.convnext_base()
    assert base.depths == (3, 3, 27, 3) and base.dims == (128, 256, 512, 1024)
    assert (base.out_dim, base.drop_path_rate, base.pos_grid, base.image_size) == (1024, 0.1, 16, 256)
    tiny = ImageEncoderConfig.tiny()
    assert tiny.image_size == 64 and tiny.pos_grid == 4
    assert ImageEncoderConfig.convnext_base(image_size=448).pos_grid == 16  # the 16-grid table, resized at 448 px
    with pytest.raises(ValueError, match="image_size"):
        ImageEncoderConfig.tiny(image_size=48)
    with pytest.raises(ValueError, match="4 stages"):
        ImageEncoderConfig(depths=(1, 1, 1), dims=(8, 16, 32))


def test_config_json_round_trip():
    cfg = ImageEncoderConfig.tiny(drop_path_rate=0.2)
    again = ImageEncoderConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [256, 448])
def test_image_encoder_shapes(res):
    s = tiny_encoder().eval()
    out = s(torch.rand(2, 3, res, res))
    g = res // 16
    d = s.config.out_dim
    assert out.tokens.shape == (2, 1 + g * g, d)
    assert out.token_pos.shape == (1 + g * g, d)
    assert out.grid == g
    assert [tuple(m.shape) for m in out.multiscale] == [(2, d, res // k, res // k) for k in (4, 8, 16, 32)]
    assert out.cls.shape == (2, d)
    assert torch.equal(out.tokens[:, 0], out.cls)


@pytest.mark.parametrize("res", [256, 448])
def test_image_encoder_matches_explicit_computation(res):
    """Normalise, run timm's trunk, adapt channels-last, add the resized table: written out here."""
    s = tiny_encoder(seed=3).eval()
    set_layer_scale(s.trunk)
    torch.manual_seed(4)
    pixels = torch.rand(2, 3, res, res)
    out = s(pixels)

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = s.trunk.stem((pixels - mean) / std)
    stages = []
    for stage in s.trunk.stages:
        x = stage(x)
        stages.append(x)
    adapters = [s.adapter_c2, s.adapter_c3, s.adapter_c4, s.adapter_c5]
    raw = [torch.einsum("bchw,oc->bohw", f, a.weight) + a.bias[None, :, None, None] for f, a in zip(stages, adapters)]
    pooled = stages[-1].mean(dim=(2, 3))
    cls = s.adapter_cls(
        F.layer_norm(pooled, (pooled.shape[1],), s.trunk.head.norm.weight, s.trunk.head.norm.bias, 1e-6)
    )

    d, g0 = s.config.out_dim, s.config.pos_grid
    table = sincos_pos_embed_2d(d, g0, cls_token=True)
    for f_raw, f_out in zip(raw, out.multiscale):
        h = f_raw.shape[-1]
        pos = F.interpolate(table_to_image(table[1:], g0), size=(h, h), mode="bicubic", align_corners=False)
        torch.testing.assert_close(f_out, f_raw + pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cls, cls, rtol=1e-5, atol=1e-5)
    # tokens: [cls; stage-2 map] WITHOUT positions (the head adds them after pos_proj/pos_ln)
    torch.testing.assert_close(out.tokens[:, 1:], raw[2].flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    g = res // 16
    want_pos = (
        table
        if g == g0
        else torch.cat(
            [
                table[:1],
                F.interpolate(table_to_image(table[1:], g0), size=(g, g), mode="bicubic", align_corners=False)
                .flatten(2)[0]
                .t(),
            ]
        )
    )
    torch.testing.assert_close(out.token_pos, want_pos, rtol=0, atol=1e-6)


def test_image_encoder_at_table_resolution_uses_table_unchanged():
    s = tiny_encoder().eval()
    out = s(torch.rand(1, 3, 256, 256))
    assert torch.equal(out.token_pos, s.pos_embed)
    raw_tokens = out.multiscale[2] - s.pos_embed[1:].t().reshape(-1, 16, 16)
    torch.testing.assert_close(out.tokens[:, 1:], raw_tokens.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)


def test_image_encoder_rejects_bad_pixels():
    s = tiny_encoder()
    with pytest.raises(ValueError, match=r"\[B, 3, R, R\]"):
        s(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, R, R\]"):
        s(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="square"):
        s(torch.rand(1, 3, 64, 96))
    with pytest.raises(ValueError, match="divisible by 32"):
        s(torch.rand(1, 3, 80, 80))


def test_low_precision_image_encoder_takes_float_pixels():
    s = tiny_encoder(image_size=64).eval()
    pixels = torch.rand(2, 3, 64, 64)
    ref = s(pixels)
    out = s.to(torch.bfloat16)(pixels)
    assert out.tokens.dtype == torch.bfloat16 and all(m.dtype == torch.bfloat16 for m in out.multiscale)
    torch.testing.assert_close(out.tokens.float(), ref.tokens, rtol=0.05, atol=0.05)


def test_pos_embed_is_a_frozen_persistent_buffer():
    s = tiny_encoder()
    assert "pos_embed" in s.state_dict() and "clip_mean" in s.state_dict()
    assert "pos_embed" not in dict(s.named_parameters())
    assert torch.equal(s.pos_embed, sincos_pos_embed_2d(32, 16, cls_token=True))
    with torch.no_grad():
        s.pos_embed.zero_()
    s.reset_buffers()
    assert torch.equal(s.pos_embed, sincos_pos_embed_2d(32, 16, cls_token=True))


# ------------------------------------------------------------------------------------------------
# freezing, drop path, gradients
# ------------------------------------------------------------------------------------------------


def _all_outputs_sum(out) -> torch.Tensor:
    return out.tokens.sum() + sum(m.sum() for m in out.multiscale)


def test_freezing_disables_drop_path_and_unfreezing_restores_it():
    s = tiny_encoder(image_size=64)
    set_layer_scale(s.trunk)
    schedule = s.drop_path_rates()
    assert len(schedule) == 3 and max(schedule) == pytest.approx(0.1) and min(schedule) > 0  # block 0 has rate 0
    pixels = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        ref = s.eval()(pixels).tokens
        train = s.train()(pixels).tokens
    assert not torch.allclose(train, ref)  # drop path active in train mode (kept paths rescaled)

    s.set_trunk_frozen(True)
    assert s.trunk_frozen and s.drop_path_rates() == [0.0] * 3
    assert s.training
    with torch.no_grad():
        assert torch.equal(s(pixels).tokens, ref)
        assert torch.equal(s(pixels).tokens, ref)

    s.set_trunk_frozen(False)
    assert s.drop_path_rates() == schedule
    assert all(p.requires_grad for p in s.parameters())


def test_frozen_trunk_gradients_reach_only_adapters():
    s = tiny_encoder(image_size=64).train()
    s.set_trunk_frozen(True)
    _all_outputs_sum(s(torch.rand(2, 3, 64, 64))).backward()
    for name, p in s.named_parameters():
        if name.startswith("adapter"):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name.startswith("trunk.") and not p.requires_grad and p.grad is None, name


def test_unfrozen_gradients_reach_every_parameter():
    s = tiny_encoder(image_size=64).eval()
    set_layer_scale(s.trunk)
    _all_outputs_sum(s(torch.rand(2, 3, 64, 64))).backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_convnext_base_parameter_counts_on_meta():
    with torch.device("meta"):
        s = ImageEncoder(ImageEncoderConfig.convnext_base())
    n_trunk = sum(p.numel() for p in s.trunk.parameters())
    n_adapt = sum(p.numel() for n, p in s.named_parameters() if n.startswith("adapter"))
    # analytic ConvNeXt-B: stem, downsamplers, blocks (dw 7x7, LN, 4x MLP, layer scale), head LN
    depths, dims = (3, 3, 27, 3), (128, 256, 512, 1024)
    want = 3 * 128 * 16 + 128 + 2 * 128
    for i, (n, d) in enumerate(zip(depths, dims)):
        if i > 0:
            want += 2 * dims[i - 1] + 4 * dims[i - 1] * d + d
        want += n * (49 * d + d + 2 * d + 4 * d * d + 4 * d + 4 * d * d + d + d)
    want += 2 * 1024
    assert n_trunk == want
    assert round(n_trunk / 1e6, 2) == 87.57  # spec §13
    assert n_adapt == (128 + 256 + 512 + 1024 + 1024) * 1024 + 5 * 1024
    assert round(n_adapt / 1e6, 2) == 3.02  # spec §13
    assert s.pos_embed.shape == (257, 1024)
    assert len(s.drop_path_rates()) == 35 and max(s.drop_path_rates()) == pytest.approx(0.1)
    assert all(m.eps == 1e-6 for m in s.trunk.modules() if hasattr(m, "eps"))
    assert not any(n.startswith("trunk.head.fc") for n, _ in s.named_parameters())


# ------------------------------------------------------------------------------------------------
# open_clip checkpoints
# ------------------------------------------------------------------------------------------------


def _assert_trunk_equals(s: ImageEncoder, src: ConvNeXt) -> None:
    own = s.trunk.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "dir", "state_dict"])
def test_load_open_clip_round_trip(tmp_path, fmt):
    src = source_trunk()
    sd = open_clip_state_dict(src)
    if fmt == "bin":
        source = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(sd, source)
    elif fmt == "safetensors":
        source = tmp_path / "open_clip_model.safetensors"
        save_file(sd, str(source))
    elif fmt == "dir":
        torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
        source = tmp_path
    else:
        source = sd
    s = tiny_encoder(seed=7, image_size=64)
    report = load_open_clip_convnext(s, source)
    _assert_trunk_equals(s, src)
    assert report.ok and report.missing == [] and report.unexpected == []
    assert sorted(report.loaded) == sorted(src.state_dict())
    assert "visual.head.proj.weight" in report.ignored and "token_embedding.weight" in report.ignored
    assert "logit_scale" in report.ignored and len(report.ignored) == 7
    if fmt in ("bin", "safetensors"):
        assert report.source == str(source)
    # the image encoder now computes the source trunk's features
    pixels = torch.rand(1, 3, 64, 64)
    x = (pixels - s.clip_mean) / s.clip_std
    src.eval()
    s.eval()
    with torch.no_grad():
        feats = src.forward_features(x)
        out = s(pixels)
        torch.testing.assert_close(out.cls, s.adapter_cls(src.forward_head(feats, pre_logits=True)))


def test_load_open_clip_accepts_state_dict_wrapper_and_module_prefix(tmp_path):
    src = source_trunk()
    sd = {f"module.{k}": v for k, v in open_clip_state_dict(src).items()}
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": sd}, path)
    s = tiny_encoder(image_size=64)
    assert s.load_open_clip(path).ok
    _assert_trunk_equals(s, src)


def test_load_open_clip_shape_mismatch_names_file_and_key(tmp_path):
    sd = open_clip_state_dict(source_trunk(dims=(8, 16, 32, 48)))
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    s = tiny_encoder(image_size=64)
    before = {k: v.clone() for k, v in s.trunk.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_open_clip_convnext(s, path)
    msg = str(e.value)
    assert str(path) in msg and "visual.trunk.stages.3.blocks.0.conv_dw.weight" in msg and "(48, 1, 7, 7)" in msg
    for k, v in s.trunk.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_load_open_clip_without_trunk_keys(tmp_path):
    sd = {k: v for k, v in open_clip_state_dict(source_trunk()).items() if not k.startswith("visual.trunk.")}
    path = tmp_path / "open_clip_model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"no 'visual\.trunk\.\*' key") as e:
        load_open_clip_convnext(tiny_encoder(image_size=64), path)
    assert str(path) in str(e.value) and "token_embedding.weight" in str(e.value)


def test_load_open_clip_missing_and_unexpected_keys(tmp_path):
    src = source_trunk()
    sd = open_clip_state_dict(src)
    del sd["visual.trunk.head.norm.weight"]
    sd["visual.trunk.head.fc.weight"] = torch.randn(3, 64)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
    s = tiny_encoder(image_size=64)
    with pytest.raises(ValueError, match=r"head\.norm\.weight") as e:
        load_open_clip_convnext(s, path)
    assert "head.fc.weight" in str(e.value) and str(path) in str(e.value)
    report = load_open_clip_convnext(s, path, strict=False)
    assert report.missing == ["head.norm.weight"] and report.unexpected == ["head.fc.weight"] and not report.ok
    assert torch.equal(s.trunk.stem[0].weight, src.stem[0].weight)
    assert not torch.equal(s.trunk.head.norm.weight, src.head.norm.weight)


def test_load_open_clip_refuses_pickled_objects(tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({"visual.trunk.stem.0.weight": torch.zeros(1), "evil": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights-only") as e:
        load_open_clip_convnext(tiny_encoder(image_size=64), path)
    assert str(path) in str(e.value)


def test_load_open_clip_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_open_clip_convnext(tiny_encoder(image_size=64), tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="none of"):
        load_open_clip_convnext(tiny_encoder(image_size=64), tmp_path)


def test_load_open_clip_into_meta_built_image_encoder():
    src = source_trunk()
    with torch.device("meta"):
        s = ImageEncoder(ImageEncoderConfig.tiny())
    report = load_open_clip_convnext(s, open_clip_state_dict(src))
    assert report.ok
    assert not any(p.is_meta for p in s.trunk.parameters())
    _assert_trunk_equals(s, src)


def test_open_clip_filter_is_timms_and_keeps_the_projection_head_out():
    """timm's convnext `checkpoint_filter_fn` recognises open_clip's layout; given the whole checkpoint it would
    turn the CLIP projection head into a classifier (`head.fc`), which DEEM's trunk does not have."""
    from timm.models.convnext import checkpoint_filter_fn

    from deem.models.vision import open_clip_convnext_filter

    src = source_trunk()
    sd = open_clip_state_dict(src)
    assert "head.fc.weight" in checkpoint_filter_fn(sd, src)
    remapped = open_clip_convnext_filter(sd, src, ignored=[k for k in sd if not k.startswith("visual.trunk.")])
    assert sorted(remapped.state) == sorted(src.state_dict())
    assert remapped.origin["stem.0.weight"] == "visual.trunk.stem.0.weight"
    assert "visual.head.proj.weight" in remapped.ignored and remapped.notes
    # a damaged checkpoint without the stem (timm would read it as a Facebook checkpoint) reports the gap
    del sd["visual.trunk.stem.0.weight"]
    s = tiny_encoder(image_size=64)
    report = load_open_clip_convnext(s, sd, strict=False)
    assert report.missing == ["stem.0.weight"] and not report.unexpected
    _assert_trunk_equals_except(s, src, "stem.0.weight")


def _assert_trunk_equals_except(s: ImageEncoder, src: ConvNeXt, skip: str) -> None:
    own = s.trunk.state_dict()
    for k, v in src.state_dict().items():
        if k != skip:
            assert torch.equal(own[k], v), k
