"""State dicts laid out like the original checkpoints, written from the ORIGINAL module trees (not from deem's
key map): RainBowLuoCS/DEEM `uni_interleaved/models/` (`MMInterleaved`) and OpenGVLab/MM-Interleaved
`mm_interleaved/models/`. Each function lists the attribute paths the original modules create and the shape of
every parameter and persistent buffer, at the sizes of `deem.models.tiny()` (heads, points, widths are taken
from that config; the original hard-codes the 7B values).

Where the original holds a third-party module unchanged (diffusers' `UNet2DConditionModel` / `AutoencoderKL`
at `StableDiffusion.unet` / `.vae`), its keys are that class's own state dict.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from deem.models import DeemConfig
from deem.models.vision import CLIP_MEAN, CLIP_STD


class Tree:
    """(key -> shape) of a checkpoint, filled by the functions below; `state()` gives random tensors."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fixed: dict[str, torch.Tensor] = {}

    def add(self, key: str, *shape: int) -> None:
        assert key not in self.shapes, key
        self.shapes[key] = tuple(shape)

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(prefix + "weight", out, inp)
        if bias:
            self.add(prefix + "bias", out)

    def layer_norm(self, prefix: str, n: int) -> None:
        self.add(prefix + "weight", n)
        self.add(prefix + "bias", n)

    def module(self, prefix: str, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            self.add(prefix + k, *v.shape)

    def state(self, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = {k: torch.randn(*s, generator=g) for k, s in self.shapes.items()}
        out.update({k: v.clone() for k, v in self.fixed.items()})
        return out


# -------------------------------------------------------------------------------------------- building blocks


def mmfs(t: Tree, p: str, *, d_model: int, d_query: int, d_value: int, d_out: int, n_levels: int, n_heads: int,
         n_points: int, ratio: float, max_images: int) -> None:
    """utils/ops/modules/mmfs.py `MMFS.__init__` (scale_ratios is a non-persistent buffer: not saved)."""
    v = int(d_model * ratio)
    t.linear(p + "sampling_offsets.", n_heads * n_points * 2, d_query)
    t.add(p + "ignore_token", 1, 1, 1, v)
    t.linear(p + "dynamic_offset_mask.", d_query, d_query)
    t.linear(p + "attention_weights.", n_heads * n_levels * (n_points + 1), d_query)
    t.linear(p + "value_proj.", v, d_value)
    t.linear(p + "output_proj.", d_out, v)
    t.add(p + "query_relpos.weight", max_images, d_query)


def qformer(t: Tree, p: str, rs: dict) -> None:
    """decoders/perceiver.py `PerceiverResampler`: `queries` + HF 4.31 `Blip2QFormerModel` (layernorm, encoder
    layers with the query FFN only) with the qk-norm patch (`q_norm`/`k_norm`, identity without qk-norm)."""
    h, heads = rs["hidden"], rs["heads"]
    t.add(p + "queries", 1, rs["num_queries"], h)
    q = p + "blip2qformer."
    t.layer_norm(q + "layernorm.", h)
    for i in range(rs["num_layers"]):
        layer = f"{q}encoder.layer.{i}."
        blocks = ["attention."] + (["crossattention."] if i % rs["cross_attention_frequency"] == 0 else [])
        for block in blocks:
            kv_in = rs["encoder_width"] if block == "crossattention." else h
            a = layer + block + "attention."
            t.linear(a + "query.", h, h)
            t.linear(a + "key.", h, kv_in)
            t.linear(a + "value.", h, kv_in)
            if rs["qk_norm"]:
                t.layer_norm(a + "q_norm.", h // heads)
                t.layer_norm(a + "k_norm.", h // heads)
            t.linear(layer + block + "output.dense.", h, h)
            t.layer_norm(layer + block + "output.LayerNorm.", h)
        t.linear(layer + "intermediate_query.dense.", rs["intermediate"], h)
        t.linear(layer + "output_query.dense.", h, rs["intermediate"])
        t.layer_norm(layer + "output_query.LayerNorm.", h)


def llama_mmfs(t: Tree, cfg: DeemConfig, vocab: int) -> None:
    """`mm_decoder` = decoders/modeling_llama_mmfs.py `LlamaModel`: embeddings, layers (self-attention with its
    persistent `rotary_emb.inv_freq` buffer, `llama_cross_attn` every `cross_attention_frequency` layers, MLP,
    RMSNorms), final norm. The LLM's lm_head is discarded by MMInterleaved (not saved)."""
    llm, m = cfg.llm, cfg.mmfs
    h, ffn, heads = llm["hidden_size"], llm["intermediate_size"], llm["num_attention_heads"]
    head_dim, vision = h // heads, m["vision_width"]
    base = llm["rope_parameters"]["rope_theta"]
    t.add("mm_decoder.embed_tokens.weight", vocab, h)
    for i in range(llm["num_hidden_layers"]):
        p = f"mm_decoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t.linear(f"{p}self_attn.{n}.", h, h, bias=False)
        t.fixed[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        if i % m["cross_attention_frequency"] == 0:
            c = p + "llama_cross_attn."
            t.add(c + "gate", 1)
            mmfs(t, c + "attn.", d_model=h, d_query=h, d_value=vision, d_out=h, n_levels=len(m["spatial_shapes"]),
                 n_heads=m["n_heads"], n_points=m["n_points"], ratio=vision / h, max_images=m["max_num_image_per_seq"])
            t.add(c + "norm1.weight", h)
            t.add(c + "norm2.weight", vision)
        t.linear(p + "mlp.gate_proj.", ffn, h, bias=False)
        t.linear(p + "mlp.down_proj.", h, ffn, bias=False)
        t.linear(p + "mlp.up_proj.", ffn, h, bias=False)
        t.add(p + "input_layernorm.weight", h)
        t.add(p + "post_attention_layernorm.weight", h)
    t.add("mm_decoder.norm.weight", h)


def text_decoder(t: Tree, cfg: DeemConfig, vocab: int, base: int) -> None:
    """decoders/decoder_text.py `TextDecoder`: head (with bias) and head_new for the added tokens."""
    h = cfg.llm["hidden_size"]
    t.linear("text_decoder.head.", vocab, h)
    t.linear("text_decoder.head_new.", vocab - base, h)


def convnext_sniffer(t: Tree, cfg: DeemConfig, clip_embed_dim: int = 16) -> None:
    """encoders/convnext_adapter/convnext_adapter_timm.py: `CLIPVisionAdapterModel.vision_model` holds the five
    adapters, an identity post_layernorm and open_clip's timm vision tower `visual` = {trunk: timm ConvNeXt after
    reset_classifier(0) (stem, stages with downsample and blocks, head.norm), head: the 'mlp' projection
    (fc1 with bias, fc2 without)}."""
    sn = cfg.image_encoder
    dims, depths, out = sn["dims"], sn["depths"], sn["out_dim"]
    p = "visual_tokenizer.sniffer.vision_model."
    tr = p + "visual.trunk."
    t.linear(tr + "stem.0.", dims[0], 3)
    t.shapes[tr + "stem.0.weight"] = (dims[0], 3, 4, 4)
    t.layer_norm(tr + "stem.1.", dims[0])
    prev = dims[0]
    for s, (d, n) in enumerate(zip(dims, depths)):
        st = f"{tr}stages.{s}."
        if s > 0:  # stage 0 keeps the stem's width and stride: identity downsample
            t.layer_norm(st + "downsample.0.", prev)
            t.add(st + "downsample.1.weight", d, prev, 2, 2)
            t.add(st + "downsample.1.bias", d)
        for b in range(n):
            blk = f"{st}blocks.{b}."
            t.add(blk + "gamma", d)
            t.add(blk + "conv_dw.weight", d, 1, 7, 7)
            t.add(blk + "conv_dw.bias", d)
            t.layer_norm(blk + "norm.", d)
            t.linear(blk + "mlp.fc1.", 4 * d, d)
            t.linear(blk + "mlp.fc2.", d, 4 * d)
        prev = d
    t.layer_norm(tr + "head.norm.", dims[-1])
    t.linear(p + "visual.head.mlp.fc1.", 2 * clip_embed_dim, dims[-1])
    t.linear(p + "visual.head.mlp.fc2.", clip_embed_dim, 2 * clip_embed_dim, bias=False)
    for name, d in zip(("c2", "c3", "c4", "c5"), dims):
        t.linear(f"{p}adapter_{name}.", out, d)
    t.linear(p + "adapter_cls.", out, dims[-1])


def tokenizer_head(t: Tree, cfg: DeemConfig, proj: dict[str, int]) -> None:
    """encoders/visual_tokenizer.py `VisualTokenizer`'s own modules: pos_proj, pos_ln, the frozen pos_embed
    Parameter (CLS row + grid), the resampler, post_ln, the projections `proj` names, and the registered
    clip_mean / clip_std buffers (persistent). DEEM's proj_i outputs `diffusion_hidden_size`, which
    MMInterleaved sets to image_embed_dim (1024, SD-2.1's cross-attention width); at the tiny sizes the
    cross-attention width."""
    d, rs = cfg.image_encoder["out_dim"], cfg.visual_tokenizer_resampler
    t.linear("visual_tokenizer.pos_proj.", d, d)
    t.layer_norm("visual_tokenizer.pos_ln.", d)
    t.add("visual_tokenizer.pos_embed", 1 + cfg.image_encoder["pos_grid"] ** 2, d)
    qformer(t, "visual_tokenizer.perceiver_resampler.", rs)
    t.layer_norm("visual_tokenizer.post_ln.", d)
    for name, width in proj.items():
        t.linear(f"visual_tokenizer.{name}.", width, rs["hidden"])
    # the CLIP constants, slightly off so that a test sees them arrive
    t.fixed["visual_tokenizer.clip_mean"] = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) + 0.01
    t.fixed["visual_tokenizer.clip_std"] = torch.tensor(CLIP_STD).view(1, 3, 1, 1) + 0.01


def mask_pooling(t: Tree, cfg: DeemConfig) -> None:
    """visual_tokenizer.py `MaskPooling` with mask_align: mask_linear = MLP(mask², hidden, width, 3 layers) and the
    shared mask_feat_linear (parameters exist only with mask_align)."""
    mp = cfg.mask_pooling
    p = "visual_tokenizer.feature_extractor."
    t.linear(p + "mask_linear.layers.0.", mp["hidden"], mp["mask_size"] ** 2)
    t.linear(p + "mask_linear.layers.1.", mp["hidden"], mp["hidden"])
    t.linear(p + "mask_linear.layers.2.", mp["width"], mp["hidden"])
    t.linear(p + "mask_feat_linear.", mp["width"], mp["feat_dim"])


def stable_diffusion(t: Tree, cfg: DeemConfig, p: str) -> None:
    """decoders/sd.py `StableDiffusion`: vae and unet (diffusers classes, their own keys) and mmfs_module =
    decoders/sd_mmfs.py `MMFSNet` (one MMFSBlock per UNet skip tensor, then the mid block); an MMFSBlock has
    query_norm, feat_norm, mmfs, the frozen pos_embed Parameter (grid = latent side) and the zero conv."""
    d = cfg.diffusion
    unet, vae = UNet2DConditionModel(**d["unet_config"]), AutoencoderKL(**d["vae_config"])
    t.module(p + "vae.", vae)
    t.module(p + "unet.", unet)
    channels, per_block = d["unet_config"]["block_out_channels"], d["unet_config"]["layers_per_block"]
    latent = d["image_size"] // 2 ** (len(d["vae_config"]["block_out_channels"]) - 1)
    widths = [channels[0]]
    for i, c in enumerate(channels):
        widths += [c] * per_block + ([c] if i < len(channels) - 1 else [])

    def block(prefix: str, c: int) -> None:
        t.layer_norm(prefix + "query_norm.", c)
        t.layer_norm(prefix + "feat_norm.", d["mmfs_feature_dim"])
        mmfs(t, prefix + "mmfs.", d_model=d["mmfs_attn_dim"], d_query=c, d_value=d["mmfs_feature_dim"], d_out=c,
             n_levels=d["mmfs_levels"], n_heads=d["mmfs_heads"], n_points=d["mmfs_points"],
             ratio=d["mmfs_deform_ratio"], max_images=d["mmfs_max_num_image_per_seq"])
        t.add(prefix + "pos_embed", latent * latent, c)
        t.add(prefix + "conv.weight", c, c, 1, 1)
        t.add(prefix + "conv.bias", c)

    for k, c in enumerate(widths):
        block(f"{p}mmfs_module.mmfs_down_blocks.{k}.", c)
    block(p + "mmfs_module.mmfs_mid_block.", channels[-1])


def image_decoder(t: Tree, cfg: DeemConfig) -> None:
    """decoders/decoder_image.py `ImageDecoder`: the resampler and the negative prompt Parameter."""
    rs = cfg.image_decoder_resampler
    qformer(t, "image_decoder.perceiver_resampler.", rs)
    t.add("image_decoder.neg_prompt_embeds", 1, rs["num_queries"], rs["hidden"])


def mm_interleaved_tail(t: Tree, cfg: DeemConfig) -> None:
    """uni_interleaved.py / mm_interleaved.py `MMInterleaved.__init__`'s last two modules (always created)."""
    h = cfg.llm["hidden_size"]
    t.linear("context_feat_proj.", h, h)
    t.add("soi_token", 1, h)


# -------------------------------------------------------------------------------------------- checkpoints


def deem_checkpoint(cfg: DeemConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DEEM pretrain / sft_caption / sft_grounding / sft_vqa checkpoint (image_decoder_config given: the SD is
    the tokenizer's `encoder`, the ImageDecoder gets a reference to it without storing it, and its negative
    prompt is also attached as `visual_tokenizer.neg_prompt_embeds`, so the state dict holds it twice)."""
    t = Tree()
    vocab, base = cfg.text_vocab_size, cfg.base_vocab_size
    llama_mmfs(t, cfg, vocab)
    text_decoder(t, cfg, vocab, base)
    stable_diffusion(t, cfg, "visual_tokenizer.encoder.")
    convnext_sniffer(t, cfg)
    tokenizer_head(t, cfg, {"proj_t": cfg.llm["hidden_size"], "proj_i": cfg.diffusion["unet_config"]
                            ["cross_attention_dim"]})
    image_decoder(t, cfg)
    mm_interleaved_tail(t, cfg)
    state = t.state(seed)
    state["visual_tokenizer.neg_prompt_embeds"] = state["image_decoder.neg_prompt_embeds"]
    return state


def deem_mask_checkpoint(cfg: DeemConfig, referring_cfg: DeemConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DEEM-MASK (sft_referring) checkpoint: image_decoder_config null (no SD, no ImageDecoder), mask_align on;
    proj_i and context_feat_proj exist anyway (created unconditionally)."""
    t = Tree()
    vocab, base = cfg.text_vocab_size, cfg.base_vocab_size
    llama_mmfs(t, cfg, vocab)
    text_decoder(t, cfg, vocab, base)
    convnext_sniffer(t, cfg)
    tokenizer_head(t, cfg, {"proj_t": cfg.llm["hidden_size"], "proj_i": cfg.diffusion["unet_config"]
                            ["cross_attention_dim"]})
    mask_pooling(t, referring_cfg)
    mm_interleaved_tail(t, cfg)
    return t.state(seed)


def clip_vit_adapter(t: Tree, p: str, width: int = 24) -> None:
    """A representative part of MM-Interleaved's encoders/vit_adapter `CLIPVisionTransformerAdapter` (HF CLIP
    vision embeddings, pre_layrnorm, encoder layers; the ViT-Adapter's level embed, spatial prior module,
    interaction blocks and up-sampling conv), at a toy width: the loader refuses the whole prefix."""
    v = p + "vision_model."
    t.add(v + "embeddings.class_embedding", width)
    t.add(v + "embeddings.patch_embedding.weight", width, 3, 14, 14)
    t.add(v + "embeddings.position_embedding.weight", 17, width)
    t.layer_norm(v + "pre_layrnorm.", width)
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t.linear(f"{v}encoder.layers.0.self_attn.{n}.", width, width)
    t.layer_norm(v + "encoder.layers.0.layer_norm1.", width)
    t.linear(v + "encoder.layers.0.mlp.fc1.", 4 * width, width)
    t.linear(v + "encoder.layers.0.mlp.fc2.", width, 4 * width)
    t.layer_norm(v + "encoder.layers.0.layer_norm2.", width)
    t.add(v + "adapter_level_embed", 3, width)
    t.add(v + "adapter_spm.stem.0.weight", 8, 3, 3, 3)
    t.linear(v + "adapter_interactions.0.injector.attn.sampling_offsets.", 16, width)
    t.add(v + "adapter_interactions.0.injector.gamma", width)
    t.add(v + "adapter_up.weight", width, width, 2, 2)


def mm_interleaved_checkpoint(cfg: DeemConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An MM-Interleaved checkpoint: txt_vocab_size = base + 2 (<soi>, <image>), the tokenizer's encoder is the
    CLIP-ViT-L/14 adapter and its projection is `proj`; the SD lives in ImageDecoder.decoder."""
    t = Tree()
    base = cfg.base_vocab_size
    llama_mmfs(t, cfg, base + 2)
    text_decoder(t, cfg, base + 2, base)
    clip_vit_adapter(t, "visual_tokenizer.encoder.")
    tokenizer_head(t, cfg, {"proj": cfg.llm["hidden_size"]})
    image_decoder(t, cfg)
    stable_diffusion(t, cfg, "image_decoder.decoder.")
    mm_interleaved_tail(t, cfg)
    return t.state(seed)
