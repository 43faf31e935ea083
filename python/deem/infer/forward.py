"""The LLM forward of the engine over `DeemModel`'s own modules (its weights, norms, rotary embedding, MLPs and
MMFS layers): a prefill of whole prompts and a one-token decode step, both writing the static caches in place.

The decode step reads only device tensors (`DecodeInputs`, fixed addresses) and has no host synchronisation, so it
can be captured as a CUDA graph. Its self-attention runs over the two cache segments (`cache.py`): the prompt
segment is shared by the sequences of a request (beams / samples become extra query rows of one matrix product),
the generated segment is per sequence. The MMFS layers read values projected once per request; the beams of a
request share them too (their queries are folded into one MMFS call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from deem.infer.cache import Bucket, CacheViews
from deem.models.llm import MMFSCrossAttention


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """A LLaMA RMSNorm module's function in one fused op (its eager form launches seven kernels per call)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def llama_qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LLaMA decoder layer's attention inputs: input RMSNorm, the q/k/v projections as [B, heads, L, head_dim]
    and the rotary embedding on q and k. The inference engine and the export graphs both start a layer here."""
    B, L, _ = h.shape
    attn = layer.self_attn
    x = rms_norm(layer.input_layernorm, h)
    q = attn.q_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, L, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


@dataclass
class DecodeInputs:
    """The static inputs of one bucket's decode step (filled before every step, read by the captured graph)."""

    bucket: Bucket
    views: CacheViews
    tokens: torch.Tensor  # [rows] the token to feed
    positions: torch.Tensor  # [rows] its position
    step: torch.Tensor  # [1] its column in the generated segment
    new_index: torch.Tensor  # [new] arange: column j is valid iff j <= step
    prompt_bias: torch.Tensor  # [batch, 1, 1, prompt] 0 where a prompt token is, -inf elsewhere
    has_images: torch.Tensor  # [batch, 1, 1] 1 for requests with images (the others skip cross-attention)
    visible: torch.Tensor  # [batch, beams, images] bool: images a generated token sees (the prompt's last row)
    terms: list[tuple[torch.Tensor, torch.Tensor]]  # per cross layer: MMFS relpos rows [batch, 1, images, .]

    @classmethod
    def allocate(cls, bucket: Bucket, views: CacheViews, cross: list[MMFSCrossAttention], device, dtype
                 ) -> DecodeInputs:
        b, rows = bucket.batch, bucket.rows
        terms = []
        for layer in cross:
            a = layer.attn
            terms.append((torch.zeros(b, 1, bucket.images, a.n_heads * a.n_points * 2, device=device, dtype=dtype),
                          torch.zeros(b, 1, bucket.images, a.n_heads * a.n_levels * a.n_points, device=device,
                                      dtype=dtype)))
        return cls(bucket, views, torch.zeros(rows, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device),
                   torch.arange(bucket.new, device=device),
                   torch.full((b, 1, 1, bucket.prompt), float("-inf"), device=device, dtype=dtype),
                   torch.zeros(b, 1, 1, device=device, dtype=dtype),
                   torch.zeros(b, bucket.beams, bucket.images, dtype=torch.bool, device=device), terms)


class DecoderForward:
    """Prefill and decode over a `DeemModel` (eval mode, no gradients). Weights are read at call time; only the
    MMFS logit rows (a reshaped slice of each layer's `attention_weights`) are cached: call `refresh()` after
    changing LLM weights."""

    def __init__(self, model) -> None:
        self.model = model
        self.llm = model.llm
        cfg = self.llm.config
        self.layers = list(self.llm.layers)
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.layers[0].self_attn.scaling if self.layers else 1.0
        self.cross_index = {i: k for k, i in enumerate(i for i, layer in enumerate(self.layers)
                                                         if layer.llama_cross_attn is not None)}
        self.cross = [self.layers[i].llama_cross_attn for i in self.cross_index]
        sides = self.llm.settings.spatial_shapes
        self.shapes = [(int(s), int(s)) for s in sides]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.logit_rows = [tuple(t.detach() for t in c.attn._logit_rows()) for c in self.cross]

    @property
    def graph_safe(self) -> bool:
        """Whether the decode step can be captured (the per-level MMFS path copies a table to the device)."""
        return all(c.attn.level_invariant(self.shapes) for c in self.cross)

    # ------------------------------------------------------------------ per request
    @torch.no_grad()
    def image_values(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Per cross layer: the MMFS values of the packed image features [B, n, S, C] -> [B, n*S, heads, dh]."""
        if self.cross:
            self.cross[0].attn.check_features(features, self.shapes)
        return [c.image_values(features) for c in self.cross]

    @torch.no_grad()
    def relpos_terms(self, visible: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cross layer: the MMFS per-image table rows of visibility [B, 1, n] (constant while decoding)."""
        return [c.attn.relpos_terms(visible, rows) for c, rows in zip(self.cross, self.logit_rows)]

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, lengths: torch.Tensor, views: CacheViews,
                visible: torch.Tensor | None, has_images: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts `embeds` [G, L, C] (row g has lengths[g] tokens), writing their K/V into the
        prompt segment rows [0, G); visible [G, L, images] bool over the bucket's image slots
        (None without images; their values are already in `views.values` rows [0, G)); has_images [G] float.
        Returns the next-token logits [G, V] (float32)."""
        G, L, _ = embeds.shape
        positions = torch.arange(L, device=embeds.device).expand(G, L)
        cos, sin = self.llm.rotary_emb(embeds, positions)
        gate = has_images.view(G, 1, 1).to(embeds.dtype)
        h = embeds
        for i, layer in enumerate(self.layers):
            residual = h
            q, k, v = llama_qkv(layer, h, cos, sin, self.head_dim)
            views.prompt[i, 0, :G, :, :L].copy_(k)
            views.prompt[i, 1, :G, :, :L].copy_(v)
            if self.kv_heads != self.n_heads:
                k = k.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.n_heads // self.kv_heads, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            h = residual + layer.self_attn.o_proj(o.transpose(1, 2).reshape(G, L, -1))
            c = self.cross_index.get(i)
            if c is not None and visible is not None:
                values = views.values[c, :G]
                h = h + self.cross[c].attend(h, values, self.shapes, visible, logit_rows=self.logit_rows[c]) * gate
            h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
        last = h[torch.arange(G, device=h.device), lengths - 1]
        return self.model.text_head(rms_norm(self.llm.norm, last)).float()

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(self, inp: DecodeInputs) -> torch.Tensor:
        """One token per row: feeds `inp.tokens` at `inp.positions`, writes their K/V at column `inp.step` of the
        generated segment, returns the next-token logits [rows, V] (float32). Device work only."""
        b = inp.bucket
        B, K, R = b.batch, b.beams, b.rows
        views = inp.views
        h = self.llm.embed_tokens(inp.tokens).view(R, 1, -1)
        cos, sin = self.llm.rotary_emb(h, inp.positions.view(R, 1))
        new_mask = inp.new_index > inp.step  # [new] columns not written yet
        for i, layer in enumerate(self.layers):
            c = self.cross_index.get(i)
            cross = None
            if c is not None and b.images > 0:
                cross = (self.cross[c], views.values[c], inp.visible, inp.terms[c], self.logit_rows[c], inp.has_images)
            h = self.layer_step(layer, h, cos, sin, views.new[i, 0], views.new[i, 1], views.prompt[i, 0],
                                views.prompt[i, 1], inp.step, inp.prompt_bias, new_mask, B, K, cross)
        return self.model.text_head(rms_norm(self.llm.norm, h[:, 0])).float()

    def compile_layers(self, **options) -> None:
        """torch.compile the per-layer decode step: every layer of one kind (with / without cross-attention)
        reuses one compiled graph (their weights are graph inputs), so compiling costs two traces per bucket."""
        self.layer_step = torch.compile(self._layer_step, dynamic=False, **options)

    def layer_step(self, *args) -> torch.Tensor:
        return self._layer_step(*args)

    def _layer_step(self, layer, h, cos, sin, kn, vn, kp, vp, step, prompt_bias, new_mask, B: int, K: int,
                    cross) -> torch.Tensor:
        """One decoder layer for one token per row (writes its K/V at column `step` of kn / vn)."""
        residual = h
        q, k, v = llama_qkv(layer, h, cos, sin, self.head_dim)  # [R, heads, 1, dh]
        kn.index_copy_(2, step, k)
        vn.index_copy_(2, step, v)
        h = residual + layer.self_attn.o_proj(self._attend(q, kp, vp, prompt_bias, kn, vn, new_mask, B, K))
        if cross is not None:
            module, values, visible, terms, logit_rows, has_images = cross
            out = module.attend(h.view(B, K, -1), values, self.shapes, visible, terms, logit_rows)
            h = h + (out * has_images).view(B * K, 1, -1)
        return h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))

    def _attend(self, q, kp, vp, prompt_bias, kn, vn, new_mask, B: int, K: int) -> torch.Tensor:
        """Attention of one query per row over the request's prompt segment and the row's generated segment,
        one softmax over both (float32, as transformers' eager attention). q [R, heads, 1, dh] -> [R, 1, C]."""
        R, H, _, dh = q.shape
        Hkv = kp.shape[1]
        G = H // Hkv
        P, T = kp.shape[2], kn.shape[2]
        q5 = q.reshape(B, K, Hkv, G, dh)
        q_prompt = q5.permute(0, 2, 1, 3, 4).reshape(B, Hkv, K * G, dh)
        s_prompt = torch.matmul(q_prompt, kp.transpose(-1, -2)) * self.scale + prompt_bias
        s_new = torch.matmul(q.reshape(R, Hkv, G, dh), kn.transpose(-1, -2)) * self.scale
        s_new = s_new.masked_fill(new_mask, float("-inf"))
        s_new = s_new.view(B, K, Hkv, G, T).permute(0, 2, 1, 3, 4).reshape(B, Hkv, K * G, T)
        p = torch.softmax(torch.cat([s_prompt, s_new], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        o_prompt = torch.matmul(p[..., :P], vp)  # [B, Hkv, K*G, dh]
        p_new = p[..., P:].reshape(B, Hkv, K, G, T).permute(0, 2, 1, 3, 4).reshape(R, Hkv, G, T)
        o_new = torch.matmul(p_new, vn)  # [R, Hkv, G, dh]
        o = o_prompt.view(B, Hkv, K, G, dh).permute(0, 2, 1, 3, 4).reshape(R, H, dh) + o_new.reshape(R, H, dh)
        return o.reshape(R, 1, H * dh)
