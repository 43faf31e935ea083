"""Original DEEM (every stage) and MM-Interleaved checkpoints into deem's model.

The fixtures (tests/models/original_trees.py) are written from the original module trees at the tiny sizes, not
from deem's key map; the checks below name the module of deem each original module must land in."""

from __future__ import annotations

import json

import pytest
import torch

from deem.models import DeemModel, tiny, with_stage
from deem.models.loading import (
    CheckpointError,
    detect_original_layout,
    load_original_checkpoint,
    original_checkpoint_filter,
)
from tests.models.original_trees import deem_checkpoint, deem_mask_checkpoint, mm_interleaved_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROPE = "self_attn.rotary_emb.inv_freq"


def model_for(stage: str, seed: int = 5) -> DeemModel:
    torch.manual_seed(seed)
    return DeemModel(with_stage(tiny(), stage))


def sub(state: dict[str, torch.Tensor], prefix: str, skip: str | None = None) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not (skip and k.endswith(skip))}


def assert_holds(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """`module`'s whole state dict is exactly `expected` (same keys, equal values)."""
    own = module.state_dict()
    assert sorted(own) == sorted(expected), (sorted(set(own) ^ set(expected)))[:10]
    for k, v in expected.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def assert_deem_body(model: DeemModel, ckpt: dict[str, torch.Tensor]) -> None:
    """The modules every DEEM stage has, each from its original module."""
    assert_holds(model.llm, sub(ckpt, "mm_decoder.", skip=ROPE))
    assert_holds(model.text_head, sub(ckpt, "text_decoder."))
    encoder, tok = model.visual_tokenizer.image_encoder, model.visual_tokenizer
    assert_holds(encoder.trunk, sub(ckpt, "visual_tokenizer.sniffer.vision_model.visual.trunk."))
    for name in ("c2", "c3", "c4", "c5", "cls"):
        adapter = sub(ckpt, f"visual_tokenizer.sniffer.vision_model.adapter_{name}.")
        assert_holds(getattr(encoder, f"adapter_{name}"), adapter)
    for name in ("pos_embed", "clip_mean", "clip_std"):
        assert torch.equal(getattr(encoder, name), ckpt[f"visual_tokenizer.{name}"]), name
    for name in ("pos_proj", "pos_ln", "post_ln", "perceiver_resampler", "proj_t"):
        assert_holds(getattr(tok, name), sub(ckpt, f"visual_tokenizer.{name}."))
    assert torch.equal(model.soi_token, ckpt["soi_token"])


# -------------------------------------------------------------------------------------------------- DEEM


@pytest.mark.parametrize("stage", ["pretrain_deem", "pretrain_baseline", "sft_caption", "sft_vqa"])
def test_deem_checkpoint_of_the_sd_stages_loads_every_module(tmp_path, stage):
    model = model_for(stage)
    ckpt = deem_checkpoint(model.config)
    torch.save(ckpt, tmp_path / "pytorch_model.bin")
    report = load_original_checkpoint(model, tmp_path / "pytorch_model.bin")
    assert "original DEEM checkpoint" in report.kind and "SD feedback" in report.kind
    assert report.ok and not report.missing and not report.unexpected
    assert_deem_body(model, ckpt)
    assert_holds(model.visual_tokenizer.proj_i, sub(ckpt, "visual_tokenizer.proj_i."))
    assert_holds(model.diffusion.unet, sub(ckpt, "visual_tokenizer.encoder.unet."))
    assert_holds(model.diffusion.vae, sub(ckpt, "visual_tokenizer.encoder.vae."))
    assert_holds(model.diffusion.mmfs_module, sub(ckpt, "visual_tokenizer.encoder.mmfs_module."))
    assert_holds(model.image_decoder, sub(ckpt, "image_decoder."))
    assert_holds(model.context_feat_proj, sub(ckpt, "context_feat_proj."))
    # deliberately consumed, each with its reason: the unused open_clip head, the RoPE buffers (checked), the
    # second name of the negative prompt
    head = sorted(k for k in ckpt if ".visual.head." in k)
    rope = sorted(k for k in ckpt if k.endswith(ROPE))
    assert len(head) == 3 and len(rope) == 4  # one per layer
    assert sorted(report.ignored) == sorted([*head, *rope, "visual_tokenizer.neg_prompt_embeds"])
    assert any("projection head" in n for n in report.notes) and any("rotary" in n for n in report.notes)
    assert len(report.loaded) == len(model.state_dict())


def test_deem_mask_checkpoint_into_the_referring_stage(tmp_path):
    model = model_for("sft_referring")
    ckpt = deem_mask_checkpoint(tiny(), model.config)
    assert any(k.startswith("context_feat_proj.") for k in ckpt) and any(".proj_i." in k for k in ckpt)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    report = load_original_checkpoint(model, path)
    assert "DEEM-MASK" in report.kind and "no diffusion model" in report.kind
    assert report.ok and not report.missing
    assert_deem_body(model, ckpt)
    assert_holds(model.visual_tokenizer.feature_extractor, sub(ckpt, "visual_tokenizer.feature_extractor."))
    # the original always creates proj_i and context_feat_proj; this configuration builds neither: consumed, noted
    unbuilt = sorted(k for k in ckpt if k.startswith(("visual_tokenizer.proj_i.", "context_feat_proj.")))
    assert len(unbuilt) == 4 and set(unbuilt) <= set(report.ignored)
    assert sum("does not build" in n and "sft_referring" in n for n in report.notes) == 2


def test_deem_mask_checkpoint_into_an_sd_stage_keeps_the_projections(tmp_path):
    model = model_for("sft_vqa")
    ckpt = deem_mask_checkpoint(tiny(), with_stage(tiny(), "sft_referring"))
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"visual_tokenizer\.feature_extractor\.mask_linear") as e:
        load_original_checkpoint(model, path)
    assert "drop=" in str(e.value) and "sft_vqa" in str(e.value)
    report = load_original_checkpoint(model, path, drop=["visual_tokenizer.feature_extractor."])
    assert_holds(model.visual_tokenizer.proj_i, sub(ckpt, "visual_tokenizer.proj_i."))
    assert_holds(model.context_feat_proj, sub(ckpt, "context_feat_proj."))
    assert report.missing and all(k.startswith(("diffusion.", "image_decoder.")) for k in report.missing)
    with pytest.raises(CheckpointError, match="model keys are not in the checkpoint"):
        load_original_checkpoint(model, path, drop=["visual_tokenizer.feature_extractor."], allow_missing=False)


def test_deem_checkpoint_loaded_from_shards(tmp_path):
    """HF Trainer's sharded `.bin` layout (pytorch_model-0000N-of-0000M.bin + index)."""
    model = model_for("pretrain_deem")
    ckpt = deem_checkpoint(model.config)
    keys = sorted(ckpt)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in shards.items():
        torch.save({k: ckpt[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert load_original_checkpoint(model, tmp_path).ok
    assert_deem_body(model, ckpt)


def test_bad_original_checkpoints_are_named(tmp_path):
    model = model_for("pretrain_deem")
    good = deem_checkpoint(model.config)

    def fails(state, pattern):
        torch.save(state, tmp_path / "bad.bin")
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_original_checkpoint(model, tmp_path / "bad.bin")
        assert str(tmp_path / "bad.bin") in str(e.value)

    fails({**good, "visual_tokenizer.mystery.weight": torch.zeros(1)}, r"visual_tokenizer\.mystery\.weight")
    rope = next(k for k in good if k.endswith(ROPE))
    fails({**good, rope: good[rope] * 2}, r"another RoPE base")
    key = "mm_decoder.layers.0.llama_cross_attn.attn.value_proj.weight"
    fails({**good, key: torch.zeros(3, 3)}, r"shape mismatch.*mm_decoder\.layers\.0\.llama_cross_attn\.attn\.value")
    fails({**good, "visual_tokenizer.neg_prompt_embeds": good["image_decoder.neg_prompt_embeds"] + 1}, "differ")
    fails({k: v for k, v in good.items() if k.startswith("text_decoder.")}, "no mm_decoder")


# ---------------------------------------------------------------------------------------------- MM-Interleaved


def test_mm_interleaved_checkpoint_is_refused_naming_its_encoder(tmp_path):
    model = model_for("pretrain_baseline")
    ckpt = mm_interleaved_checkpoint(model.config)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_original_checkpoint(model, path)
    msg = str(e.value)
    assert "MM-Interleaved checkpoint" in msg and "visual_tokenizer.encoder.*" in msg
    assert "CLIP-ViT-L/14" in msg and "does not implement" in msg and "drop=['visual_tokenizer.encoder.']" in msg
    for k, v in model.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k


def test_mm_interleaved_checkpoint_with_its_encoder_dropped_lands_in_the_right_modules(tmp_path):
    model = model_for("pretrain_baseline")
    ckpt = mm_interleaved_checkpoint(model.config)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ckpt, path)
    # its vocabulary has two added tokens, deem's six: the embedding and the text head do not fit
    with pytest.raises(CheckpointError, match=r"shape mismatch.*text_decoder\.head"):
        load_original_checkpoint(model, path, drop=["visual_tokenizer.encoder."])
    drop = ["visual_tokenizer.encoder.", "text_decoder.", "mm_decoder.embed_tokens."]
    report = load_original_checkpoint(model, path, drop=drop)
    assert report.kind.startswith("MM-Interleaved")
    # the SD of the image decoder is deem's diffusion model, nothing of the ViT lands there
    assert_holds(model.diffusion.unet, sub(ckpt, "image_decoder.decoder.unet."))
    assert_holds(model.diffusion.vae, sub(ckpt, "image_decoder.decoder.vae."))
    assert_holds(model.diffusion.mmfs_module, sub(ckpt, "image_decoder.decoder.mmfs_module."))
    assert_holds(model.visual_tokenizer.proj_t, sub(ckpt, "visual_tokenizer.proj."))
    assert_holds(model.image_decoder, {k: v for k, v in sub(ckpt, "image_decoder.").items()
                                       if not k.startswith("decoder.")})
    for name in ("pos_proj", "pos_ln", "post_ln", "perceiver_resampler"):
        assert_holds(getattr(model.visual_tokenizer, name), sub(ckpt, f"visual_tokenizer.{name}."))
    layer0 = sub(ckpt, "mm_decoder.layers.0.", skip=ROPE)
    assert_holds(model.llm.layers[0], layer0)
    assert set(report.ignored) == {k for k in ckpt if k.startswith(tuple(drop)) or k.endswith(ROPE)}
    # what MM-Interleaved has no counterpart for stays as it was, and is reported
    prefixes = ("visual_tokenizer.image_encoder.trunk.", "visual_tokenizer.image_encoder.adapter_",
                "visual_tokenizer.proj_i.", "text_head.", "llm.embed_tokens.")
    assert report.missing and all(k.startswith(prefixes) for k in report.missing)


# ------------------------------------------------------------------------------------------------ layouts


def test_layout_detection_names_each_kind():
    cfg = tiny()
    referring = with_stage(cfg, "sft_referring")
    assert detect_original_layout(deem_checkpoint(cfg)).name == "deem"
    assert detect_original_layout(deem_mask_checkpoint(cfg, referring)).name == "deem_mask"
    assert detect_original_layout(mm_interleaved_checkpoint(cfg)).name == "mm_interleaved"
    vit = {"mm_decoder.norm.weight": torch.ones(1),
           "visual_tokenizer.sniffer.vision_model.embeddings.patch_embedding.weight": torch.ones(1)}
    layout = detect_original_layout(vit)
    assert layout.name == "deem_vit"
    with pytest.raises(CheckpointError, match=r"CLIP-ViT \+ ViT-Adapter sniffer.*does not implement"):
        original_checkpoint_filter(vit, model_for("pretrain_deem"))
    with pytest.raises(CheckpointError, match="cannot tell DEEM from MM-Interleaved"):
        detect_original_layout({"mm_decoder.norm.weight": torch.ones(1)})
