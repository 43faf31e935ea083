"""The whole DEEM model on the tiny configuration: losses, stages, loading, generation, TTA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deem.ops
from deem.data.labels import build_labels
from deem.models import STAGES, DeemModel, tiny, with_stage
from deem.models.loading import ORIGINAL_KEY_MAP, CheckpointError, read_state_dict
from deem.tokens import SpecialTokens

pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(cfg, seed=0):
    sp = cfg.special_tokens
    g = torch.Generator().manual_seed(seed)
    n_tok = cfg.num_img_token

    def seq(n_img):
        ids = [sp["bos"]]
        for i in range(n_img):
            ids += [10 + i, 11 + i, sp["soi"], *[sp["image"]] * n_tok]
        return [*ids, 20, 21, sp["eos"]]

    rows = [seq(1), seq(2)]
    L = max(map(len, rows))
    ids = torch.full((2, L), sp["pad"])
    att = torch.zeros(2, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    size = cfg.image_encoder["image_size"]
    images = torch.rand(3, 3, size, size, generator=g)
    labels = build_labels(ids, att, att.bool(), SpecialTokens.from_dict(sp))  # every token of the sequences
    return dict(text_ids=ids, attention_mask=att, gt_text_ids=labels, image_tensors=images,
                image_tensors_dec=images.clone(), num_image_per_seq=torch.tensor([1, 2]),
                nearest_bos_idxs=torch.tensor([0, 0, 0]))


def make_model(stage="pretrain_deem", seed=0):
    torch.manual_seed(seed)
    return DeemModel(with_stage(tiny(), stage))


def wake_zero_inits(model):
    """Gates and zero convolutions start at zero (exact no-ops); open them so gradients flow everywhere."""
    with torch.no_grad():
        for cross in model.llm.cross_attention_layers():
            cross.gate.fill_(0.5)
        if model.diffusion is not None:
            for block in model.diffusion.mmfs_module.blocks():
                block.conv.weight.normal_(0, 0.1)


def test_three_losses_finite_forward_and_backward():
    model = make_model()
    model.train()
    out = model(**make_batch(model.config), generator=torch.Generator().manual_seed(0))
    for loss in (out.loss, out.loss_txt, out.loss_img, out.loss_feedback):
        assert loss is not None and torch.isfinite(loss)
    expected = out.loss_txt + 5.0 * out.loss_img + 5.0 * out.loss_feedback
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# Frozen by design in every stage although requires_grad could suggest otherwise: none.
# Parameters that legitimately get no gradient from one batch:
NO_GRAD_FROM_BATCH = ("ignore_token", "neg_prompt_embeds", "query_relpos")


@pytest.mark.parametrize("stage", STAGES)
def test_gradients_reach_exactly_the_trained_parameters(stage):
    model = make_model(stage)
    wake_zero_inits(model)
    model.train()
    cfg = model.config
    batch = make_batch(cfg)
    if stage == "sft_referring":
        batch["image_tensors_mask"] = (torch.rand(3, 1, *batch["image_tensors"].shape[-2:]) > 0.3).float()
    model(**batch, generator=torch.Generator().manual_seed(1)).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= trainable, sorted(got - trainable)[:5]
    silent = {n for n in trainable - got if not n.endswith(NO_GRAD_FROM_BATCH)}
    assert not silent, sorted(silent)[:8]
    prefixes = {n.split(".")[0] + "." + n.split(".")[1] if "." in n else n for n in trainable}
    llm_body = any(n.startswith("llm.layers.1.self_attn") for n in trainable)
    assert llm_body == (not cfg.freeze_llm)
    assert "text_head.head.weight" not in trainable and "text_head.head_new.weight" in trainable
    trunk = any(n.startswith("visual_tokenizer.image_encoder.trunk.") for n in trainable)
    assert trunk == (not cfg.freeze_image_encoder)
    assert any(n.startswith("visual_tokenizer.image_encoder.adapter_c3") for n in trainable)
    if model.diffusion is not None:
        assert not any(n.startswith("diffusion.vae.") for n in trainable)
        assert any(n.startswith("diffusion.unet.") for n in trainable) == (not cfg.freeze_unet)
        assert "diffusion.mmfs_module" in prefixes
    if stage == "pretrain_baseline":
        assert model(**batch).loss_feedback is None  # the MM-Interleaved baseline has no feedback loss
    if stage == "sft_referring":
        assert model.diffusion is None and any(n.startswith("visual_tokenizer.feature_extractor") for n in trainable)


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model()
    wake_zero_inits(model)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    again = DeemModel.from_pretrained(tmp_path / "ckpt")
    again.eval()
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    batch = make_batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert again.config.stage == "pretrain_deem"
    assert [n for n, p in again.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]


def _original_format(model) -> dict[str, torch.Tensor]:
    """Our state dict written back under the original's names (the inverse of ORIGINAL_KEY_MAP)."""
    inverse = [(new, old) for old, new in ORIGINAL_KEY_MAP if new is not None]
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual_tokenizer.image_encoder.pos_embed"):
            out["visual_tokenizer.pos_embed"] = value
            continue
        if key.startswith("visual_tokenizer.image_encoder.clip_"):
            continue  # constants, not in the original checkpoint
        for new, old in inverse:
            if key.startswith(new):
                out[old + key[len(new):]] = value.clone()
                break
    out["image_decoder.neg_prompt_embeds"] = out["visual_tokenizer.neg_prompt_embeds"]  # stored under both names
    for k in list(out):  # the original stores its SD twice
        if k.startswith("visual_tokenizer.encoder."):
            out["image_decoder.decoder." + k[len("visual_tokenizer.encoder."):]] = out[k]
    out["visual_tokenizer.sniffer.vision_model.visual.head.proj.weight"] = torch.zeros(3, 3)  # dropped head
    return out


def test_original_checkpoint_key_map(tmp_path):
    source = make_model(seed=1)
    wake_zero_inits(source)
    torch.save(_original_format(source), tmp_path / "pytorch_model.bin")
    target = make_model(seed=2)
    report = target.load_original_checkpoint(tmp_path / "pytorch_model.bin")
    assert not report.unexpected
    assert all(k.startswith("visual_tokenizer.image_encoder.clip_") for k in report.missing), report.missing
    assert "visual_tokenizer.sniffer.vision_model.visual.head.proj.weight" in report.ignored
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    bad = _original_format(source)
    bad["mm_decoder.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    torch.save(bad, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        target.load_original_checkpoint(tmp_path / "bad.bin")
    unknown = _original_format(source)
    unknown["mystery.weight"] = torch.zeros(1)
    torch.save(unknown, tmp_path / "unknown.bin")
    with pytest.raises(CheckpointError, match=r"mystery\.weight"):
        target.load_original_checkpoint(tmp_path / "unknown.bin")


def test_from_components_in_the_real_formats(tmp_path):
    from transformers import LlamaForCausalLM

    from deem.models.diffusion import DiffusionFeedback

    cfg = tiny()
    # a HF LLaMA causal LM with the base vocabulary, saved with save_pretrained (safetensors)
    torch.manual_seed(3)
    hf_cfg = cfg.llm_config
    hf_cfg.vocab_size = cfg.base_vocab_size
    llama = LlamaForCausalLM(hf_cfg)
    llama.save_pretrained(tmp_path / "vicuna")
    # a diffusers SD directory (unet/, vae/, scheduler/)
    sd = DiffusionFeedback(cfg.diffusion_config)
    sd.unet.save_pretrained(tmp_path / "sd" / "unet")
    sd.vae.save_pretrained(tmp_path / "sd" / "vae")
    sd.scheduler.save_pretrained(tmp_path / "sd" / "scheduler")
    # an open_clip ConvNeXt checkpoint: visual.trunk.* keys plus text-tower keys, as a .bin
    encoder_src = DeemModel(cfg).visual_tokenizer.image_encoder
    clip = {f"visual.trunk.{k}": v for k, v in encoder_src.trunk.state_dict().items()}
    clip["token_embedding.weight"] = torch.zeros(4, 4)
    torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")

    model, reports = DeemModel.from_components(cfg, llm_path=tmp_path / "vicuna", diffusion_path=tmp_path / "sd",
                                               image_encoder_checkpoint=tmp_path / "open_clip_pytorch_model.bin",
                                               generator=torch.Generator().manual_seed(0))
    llama_sd = llama.state_dict()
    ours = model.state_dict()
    assert torch.equal(ours["llm.layers.2.mlp.up_proj.weight"], llama_sd["model.layers.2.mlp.up_proj.weight"])
    emb = ours["llm.embed_tokens.weight"]
    assert emb.shape[0] == cfg.text_vocab_size
    assert torch.equal(emb[: cfg.base_vocab_size], llama_sd["model.embed_tokens.weight"])
    assert torch.equal(ours["text_head.head.weight"][: cfg.base_vocab_size], llama_sd["lm_head.weight"])
    assert (ours["text_head.head.bias"][cfg.base_vocab_size:] == -100).all()
    assert torch.equal(ours["diffusion.unet.conv_in.weight"], sd.unet.state_dict()["conv_in.weight"])
    stem = "visual_tokenizer.image_encoder.trunk.stem.0.weight"
    assert torch.equal(ours[stem], encoder_src.trunk.state_dict()["stem.0.weight"])
    assert all(r.loaded for r in reports)
    # the saved model no longer refers to the SD directory
    model.save_pretrained(tmp_path / "deem")
    saved = json.loads((tmp_path / "deem" / "config.json").read_text())
    assert saved["diffusion"]["pretrained_path"] is None and saved["diffusion"]["unet_config"]
    assert read_state_dict(tmp_path / "deem")["llm.norm.weight"].shape == (cfg.llm["hidden_size"],)
    with pytest.raises(CheckpointError, match="no weights found"):
        read_state_dict(tmp_path / "sd")


def test_generation_is_well_formed():
    model = make_model()
    model.eval()
    cfg = model.config
    sp = cfg.special_tokens
    prompt = [sp["bos"], sp["soi"], *[sp["image"]] * cfg.num_img_token, 30, 31]
    ids = torch.tensor([[sp["pad"], *prompt], [sp["pad"], sp["pad"], *prompt[:-1]]])
    att = (ids != sp["pad"]).long()
    images = make_batch(cfg)["image_tensors"][:2]
    for beams in (1, 3):
        out = model.generate_texts(ids, att, images, torch.tensor([1, 1]), max_new_tokens=6, min_new_tokens=2,
                                   num_beams=beams)
        assert out.dtype == torch.long and out.shape[0] == 2 and 2 <= out.shape[1] <= 6
        assert ((out >= 0) & (out < cfg.text_vocab_size)).all()
    scores = model.generate_scores([prompt, prompt[:-1]], [[[5], [6, 7]], [[8]]], images)
    assert scores.shape == (2, 2) and torch.isfinite(scores[0]).all() and scores[1, 1] == float("-inf")
    gen_ids = torch.tensor([[sp["bos"], 40, 41, sp["soi"], *[sp["image"]] * cfg.num_img_token]])
    pics = model.generate_images(gen_ids, torch.ones_like(gen_ids), images[:1], torch.tensor([1]),
                                 num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    size = cfg.diffusion["image_size"]
    assert pics.shape == (1, 3, size, size) and pics.min() >= 0 and pics.max() <= 1


def test_test_time_adaptation_restores_every_weight():
    model = make_model()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = make_batch(model.config)
    with torch.no_grad():
        reference = model(**batch).logits
    with model.test_time_adaptation(batch["image_tensors"][:1], batch["image_tensors_dec"][:1], steps=2, samples=2,
                                    lr=1e-2, generator=torch.Generator().manual_seed(0)) as losses:
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference)


def test_compiled_op_and_reference_agree_inside_the_model():
    model = make_model()
    wake_zero_inits(model)
    model.eval()
    batch = make_batch(model.config)
    with torch.no_grad():
        fast = model(**batch).logits
        with deem.ops.reference_kernels():
            slow = model(**batch).logits
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_info_counts_match_the_spec_for_deem_7b():
    out = subprocess.run([sys.executable, "-m", "deem", "info", "--config", "deem_7b", "--json"], check=True,
                         capture_output=True, text=True).stdout
    counts = json.loads(out)
    mega = {k: round(v["total"] / 1e6, 2) for k, v in counts.items()}
    assert mega["llm"] == pytest.approx(6607.37 + 200.47, abs=0.02)  # spec §13: LLaMA body + MMFS
    assert mega["text_head"] == pytest.approx(131.15, abs=0.01)
    assert mega["visual_tokenizer"] == pytest.approx(87.57 + 3.02 + 101.66 + 4.99, abs=0.02)
    assert mega["image_decoder"] == pytest.approx(21.07 + 0.08, abs=0.01)
    assert mega["diffusion"] == pytest.approx(865.91 + 83.65 + 56.98 + 44.56 + 0.01, abs=0.03)
    assert counts["total"]["trainable"] / 1e6 == pytest.approx(494.8 - 2.13, abs=0.1)  # minus the unused head


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = tiny()
        cfg.llm_gradient_checkpointing = checkpointing
        model = DeemModel(cfg)
        wake_zero_inits(model)
        model.train()
        model(**make_batch(cfg), generator=torch.Generator().manual_seed(0)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


def test_generate_scores_match_a_plain_forward_and_do_not_depend_on_chunking():
    model = make_model()
    wake_zero_inits(model)
    model.eval()
    cfg = model.config
    sp = cfg.special_tokens
    ctx = [sp["bos"], sp["soi"], *[sp["image"]] * cfg.num_img_token, 30, 31]
    options = [[5], [6, 7], [8, 9, 10]]
    image = make_batch(cfg)["image_tensors"][:1]
    one = model.generate_scores([ctx], [options], image, options_per_batch=1)
    many = model.generate_scores([ctx], [options], image, options_per_batch=16)
    assert torch.allclose(one, many, atol=1e-5)
    ids = torch.tensor([[*ctx, 6, 7]])
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids), image, num_image_per_seq=torch.tensor([1]), loss_img_weight=0.0)
        logp = out.logits.log_softmax(-1)
    expected = logp[0, len(ctx) - 1, 6] + logp[0, len(ctx), 7]
    assert torch.allclose(one[0, 1], expected, atol=1e-5)


def test_test_time_adaptation_masks_the_patches_as_training_does():
    """With region masks, adaptation scores the same visual tokens as the training path: the patch tokens
    outside the region are masked before the Q-Former in both (adaptation once skipped that)."""
    model = make_model()
    model.train()
    batch = make_batch(model.config)
    images, images_dec = batch["image_tensors"][:1], batch["image_tensors_dec"][:1]
    masks = torch.zeros(1, 1, *images.shape[-2:])
    masks[..., : images.shape[-2] // 2, :] = 1.0  # the upper half
    seen = []
    hook = model.visual_tokenizer.perceiver_resampler.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone()))
    with model.test_time_adaptation(images, images_dec, masks, steps=1, samples=1,
                                    generator=torch.Generator().manual_seed(0)):
        pass  # the first (and only) loss is computed before the optimizer step: with the original weights
    model.visual_tokenizer(images, masks=masks)
    hook.remove()
    adapted, trained = seen
    assert torch.equal(adapted, trained)
    seen.clear()
    hook = model.visual_tokenizer.perceiver_resampler.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].detach().clone()))
    model.visual_tokenizer(images)  # the mask matters: without it the tokens differ
    hook.remove()
    assert not torch.equal(seen[0], trained)


def test_training_forward_needs_the_collators_labels():
    model = make_model()
    model.train()
    batch = make_batch(model.config)
    del batch["gt_text_ids"]
    with pytest.raises(ValueError, match="gt_text_ids"):
        model(**batch)
    model.eval()
    with torch.no_grad():
        out = model(**batch)  # inference: logits, no text loss
    assert out.loss_txt is None and out.logits is not None
