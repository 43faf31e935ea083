"""The three deployable graphs of a `DeemModel` as functional modules (no in-place cache writes, no host reads), so
that `torch.export` traces them with dynamic batch, sequence and image-count axes:

* `VisionGraph`: pixels -> visual tokens (the LLM embeddings of the image tokens) and the packed multi-scale
  features the LLM's cross-attention layers read;
* `PrefillGraph`: a right-padded batch of prompts with its images -> next-token logits, the prompts' KV cache, the
  per-layer MMFS values and the image visibility of the tokens to generate;
* `DecodeGraph`: one token per sequence and the caches -> logits and the caches grown by one column.

They compute what the inference engine (`deem.infer`) computes, over the model's own modules: the same RMSNorm,
projections, rotary embedding, MMFS halves (`MMFSCrossAttention.image_values` / `attend`) and text head, and the
same rules (tokens see the images of their `<s>` segment that start before them; generated tokens see what the
prompt's last token sees; a sequence without images skips cross-attention). The engine's two-segment cache is an
optimisation for beams; the graphs keep one KV row per sequence, optimum-style: `past_key.{i}` / `present_key.{i}`
of shape [batch, kv_heads, tokens, head_dim] per decoder layer, and an attention mask over all cached columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deem.infer.forward import llama_qkv, rms_norm
from deem.models.mmfs import image_relpos


class _LLMParts:
    """What the prefill and decode graphs share: the model's LLM modules and sizes."""

    def __init__(self, model) -> None:
        llm = model.llm
        cfg = llm.config
        self.model, self.llm = model, llm
        self.layers = list(llm.layers)
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.layers[0].self_attn.scaling if self.layers else 1.0
        self.cross_index = {i: k for k, i in enumerate(i for i, layer in enumerate(self.layers)
                                                         if layer.llama_cross_attn is not None)}
        self.cross = [self.layers[i].llama_cross_attn for i in self.cross_index]
        self.shapes = [(int(s), int(s)) for s in llm.settings.spatial_shapes]

    def qkv(self, layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return llama_qkv(layer, h, cos, sin, self.head_dim)

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.n_heads // self.kv_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.text_head(rms_norm(self.llm.norm, h)).float()


class VisionGraph(nn.Module):
    """pixels [images, 3, R, R] in [0, 1] (the eval view) -> image_embeds [images, num_img_token, hidden] and
    image_features [images, S, vision_width]: the levels of the LLM's MMFS (`mmfs.spatial_shapes`, fine to coarse)
    flattened row-major and concatenated, as the engine packs them."""

    def __init__(self, model) -> None:
        super().__init__()
        self.visual_tokenizer = model.visual_tokenizer
        self.sides = tuple(int(s) for s in model.llm.settings.spatial_shapes)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vis = self.visual_tokenizer(pixels)
        levels = [m for m in vis.multiscale if m.shape[-1] in self.sides]
        if len(levels) != len(self.sides):
            raise ValueError(f"the image encoder's maps have sides {[m.shape[-1] for m in vis.multiscale]}; the "
                             f"LLM's MMFS layers expect {list(self.sides)} (check the image size)")
        features = torch.cat([lvl.flatten(2).transpose(1, 2) for lvl in levels], dim=1)
        return vis.embeds, features


def token_image_visibility(input_ids: torch.Tensor, images: int, soi_id: int, bos_id: int) -> torch.Tensor:
    """[B, L, images] bool: token t sees image slot j (the j-th `<soi>` of its row) iff that image starts before t
    (its `<soi>` is at a position < t) and no `<s>` lies between them, i.e. both are in the same `<s>` segment
    (spec/model.md §6.4; the same relation as `cross_attention_visibility`, in cumulative sums only)."""
    soi = (input_ids == soi_id).long()
    segment = torch.cumsum((input_ids == bos_id).long(), dim=1)  # [B, L]: number of <s> at or before t
    soi_rank = torch.cumsum(soi, dim=1) - 1  # rank of each <soi> within its row
    soi_before = soi_rank + 1 - soi  # <soi> tokens strictly before t
    slots = torch.arange(images, device=input_ids.device)
    is_slot = (soi_rank[:, :, None] == slots) & (soi[:, :, None] > 0)  # [B, L, images]: <soi> of image j at t
    image_segment = (is_slot.long() * segment[:, :, None]).sum(1)  # [B, images]
    return (slots < soi_before[:, :, None]) & (image_segment[:, None, :] == segment[:, :, None])


class PrefillGraph(nn.Module):
    """input_ids [B, L] int64 (right-padded), attention_mask [B, L] int64 (1 on the prompt tokens),
    image_embeds [B, I, num_img_token, hidden] and image_features [B, I, S, vision_width] (each row's images in
    prompt order, zeros in unused slots) ->
    logits [B, vocab] float32 (after each row's last prompt token), present_key.{i} / present_value.{i}
    [B, kv_heads, L, head_dim] per layer, cross_values.{c} [B, I*S, mmfs_heads, mmfs_head_dim] per cross-attention
    layer, image_visible [B, I] bool (what the generated tokens see) and has_images [B] bool."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.parts = _LLMParts(model)
        sp = model.config.special_tokens
        self.image_id, self.soi_id, self.bos_id = int(sp["image"]), int(sp["soi"]), int(sp["bos"])

    def output_names(self) -> list[str]:
        n, c = len(self.parts.layers), len(self.parts.cross)
        return (["logits"] + [f"present_{kind}.{i}" for i in range(n) for kind in ("key", "value")]
                + [f"cross_values.{k}" for k in range(c)] + ["image_visible", "has_images"])

    def forward(self, input_ids, attention_mask, image_embeds, image_features):
        p, model = self.parts, self.model
        B, L = input_ids.shape
        n_img, n_tok, C = image_embeds.shape[1:]
        embeds = p.llm.embed_tokens(input_ids).to(image_embeds.dtype)
        # image tokens take the images' embeddings in order; <soi> gets the learnt soi vector added
        is_image = input_ids == self.image_id
        rank = (torch.cumsum(is_image.long(), dim=1) - 1).clamp(0, n_img * n_tok - 1)
        rows = torch.gather(image_embeds.reshape(B, n_img * n_tok, C), 1, rank[:, :, None].expand(B, L, C))
        embeds = torch.where(is_image[:, :, None], rows, embeds)
        soi = input_ids == self.soi_id
        embeds = embeds + soi[:, :, None].to(embeds.dtype) * model.soi_token.to(embeds.dtype).view(1, 1, -1)
        visible = token_image_visibility(input_ids, n_img, self.soi_id, self.bos_id)
        has_images = soi.any(dim=1)
        gate = has_images.to(embeds.dtype).view(B, 1, 1)
        lengths = attention_mask.long().sum(1)

        positions = torch.arange(L, device=input_ids.device)[None].expand(B, L)
        cos, sin = p.llm.rotary_emb(embeds, positions)
        values = [c.image_values(image_features) for c in p.cross]
        cache: list[torch.Tensor] = []
        h = embeds
        for i, layer in enumerate(p.layers):
            residual = h
            q, k, v = p.qkv(layer, h, cos, sin)
            cache += [k, v]
            o = F.scaled_dot_product_attention(q, p.expand_kv(k), p.expand_kv(v), is_causal=True, scale=p.scale)
            h = residual + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, L, -1))
            c = p.cross_index.get(i)
            if c is not None:
                h = h + p.cross[c].attend(h, values[c], p.shapes, visible) * gate
            h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
        last = torch.gather(h, 1, (lengths - 1).clamp_min(0)[:, None, None].expand(B, 1, h.shape[-1]))[:, 0]
        decode_visible = torch.gather(visible, 1, (lengths - 1).clamp_min(0)[:, None, None].expand(B, 1, n_img))[:, 0]
        return (p.head(last), *cache, *values, decode_visible, has_images)


def relpos_tables(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image rows MMFS adds to the offsets and logits of a query, for every relative image position
    (row r: the r-th most recent visible image; row 0: invisible), through the public `MMFS.relpos_terms`."""
    n = attn.max_num_image_per_seq
    visible = torch.ones(1, 1, n, dtype=torch.bool, device=attn.query_relpos.weight.device)
    visible[..., -1] = False  # relative positions n-1, ..., 1, then 0
    order = image_relpos(visible)[0, 0]
    off, logit = (t[0, 0] for t in attn.relpos_terms(visible))
    return torch.empty_like(off).index_copy_(0, order, off), torch.empty_like(logit).index_copy_(0, order, logit)


class DecodeGraph(nn.Module):
    """input_ids [B, 1] int64, position_ids [B, 1] int64, attention_mask [B, T+1] int64 (1 on the valid cached
    columns and the new token), past_key.{i} / past_value.{i} [B, kv_heads, T, head_dim], cross_values.{c},
    image_visible [B, I] bool, has_images [B] bool -> logits [B, vocab] float32 and present_key.{i} /
    present_value.{i} [B, kv_heads, T+1, head_dim] (the past with the new token's K/V appended)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.parts = _LLMParts(model)
        # the relative-position rows depend on the weights only: constants of the graph (the engine computes the
        # same rows once per request)
        for k, cross in enumerate(self.parts.cross):
            off, logit = relpos_tables(cross.attn)
            self.register_buffer(f"relpos_offsets_{k}", off.detach().clone(), persistent=False)
            self.register_buffer(f"relpos_logits_{k}", logit.detach().clone(), persistent=False)

    def input_names(self) -> list[str]:
        n, c = len(self.parts.layers), len(self.parts.cross)
        return (["input_ids", "position_ids", "attention_mask"]
                + [f"past_{kind}.{i}" for i in range(n) for kind in ("key", "value")]
                + [f"cross_values.{k}" for k in range(c)] + ["image_visible", "has_images"])

    def output_names(self) -> list[str]:
        n = len(self.parts.layers)
        return ["logits"] + [f"present_{kind}.{i}" for i in range(n) for kind in ("key", "value")]

    def forward(self, input_ids, position_ids, attention_mask, past: list[torch.Tensor], values: list[torch.Tensor],
                image_visible, has_images):
        """`past`: past_key.0, past_value.0, past_key.1, ...; `values`: cross_values.0, ... (see the class)."""
        p = self.parts
        B = input_ids.shape[0]
        h = p.llm.embed_tokens(input_ids)
        cos, sin = p.llm.rotary_emb(h, position_ids)
        invalid = (attention_mask == 0)[:, None, None, :]  # [B, 1, 1, T+1]
        visible = image_visible[:, None, :]
        relpos = image_relpos(visible)
        gate = has_images.to(h.dtype).view(B, 1, 1)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(p.layers):
            residual = h
            q, k, v = p.qkv(layer, h, cos, sin)
            keys = torch.cat([past[2 * i], k], dim=2)
            vals = torch.cat([past[2 * i + 1], v], dim=2)
            present += [keys, vals]
            scores = torch.matmul(q, p.expand_kv(keys).transpose(-1, -2)) * p.scale
            probs = torch.softmax(scores.masked_fill(invalid, float("-inf")), dim=-1, dtype=torch.float32)
            o = torch.matmul(probs.to(q.dtype), p.expand_kv(vals))
            h = residual + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
            k_cross = p.cross_index.get(i)
            if k_cross is not None:
                terms = (F.embedding(relpos, getattr(self, f"relpos_offsets_{k_cross}")),
                         F.embedding(relpos, getattr(self, f"relpos_logits_{k_cross}")))
                h = h + p.cross[k_cross].attend(h, values[k_cross], p.shapes, visible, terms) * gate
            h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
        return (p.head(h[:, 0]), *present)
