"""The static caches of the engine: the KV cache in two segments and the per-image MMFS values.

Layout (per decoder layer, `Bucket` sizes):

* prompt segment  K, V [batch, kv_heads, prompt, head_dim]: one row per *request*, shared by its beams/samples;
* generated segment K, V [rows, kv_heads, new, head_dim]: one row per sequence (rows = batch x beams); beam search
  reorders only this segment (a few hundred tokens at most), never the prompt;
* MMFS values [batch, images * S, heads, head_dim] per cross-attention layer: computed once per request.

All three live in flat buffers allocated once (`CacheArena`); a bucket's tensors are contiguous views from the
start of each buffer, so their addresses never change and CUDA graphs captured on them stay valid. The buffers
grow (and `version` changes, invalidating captured graphs) only when a larger bucket arrives. They start as zeros
and only ever receive finite values: masked cache entries get exactly zero weight, and 0 * finite = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deem.models.llm import DeemLlamaModel


@dataclass(frozen=True)
class Bucket:
    """The static shape of one decoding batch."""

    batch: int  # requests
    beams: int  # sequences per request (beams or samples)
    prompt: int  # prompt capacity (tokens)
    new: int  # generated-token capacity
    images: int  # image slots per request (0: no cross-attention inputs)

    @property
    def rows(self) -> int:
        return self.batch * self.beams


@dataclass(frozen=True)
class CacheDims:
    """The model sizes the caches depend on."""

    layers: int
    kv_heads: int
    head_dim: int
    cross_layers: int
    mmfs_heads: int
    mmfs_head_dim: int
    image_rows: int  # S: feature rows per image (sum over levels of H * W)

    @classmethod
    def of(cls, llm: DeemLlamaModel) -> CacheDims:
        cfg = llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        cross = llm.cross_attention_layers()
        attn = cross[0].attn if cross else None
        sides = llm.settings.spatial_shapes
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, len(cross),
                   attn.n_heads if attn else 0, attn.head_dim if attn else 0, sum(int(s) * int(s) for s in sides))

    def sizes(self, b: Bucket) -> tuple[int, int, int]:
        """Elements of the prompt, generated and values buffers a bucket needs."""
        prompt = self.layers * 2 * b.batch * self.kv_heads * b.prompt * self.head_dim
        new = self.layers * 2 * b.rows * self.kv_heads * b.new * self.head_dim
        values = self.cross_layers * b.batch * b.images * self.image_rows * self.mmfs_heads * self.mmfs_head_dim
        return prompt, new, values


@dataclass
class CacheViews:
    """A bucket's tensors (views into the arena)."""

    prompt: torch.Tensor  # [layers, 2, batch, kv_heads, prompt, head_dim]
    new: torch.Tensor  # [layers, 2, rows, kv_heads, new, head_dim]
    values: torch.Tensor  # [cross_layers, batch, images * S, mmfs_heads, mmfs_head_dim]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row r of the generated segment becomes old row `rows[r]` (every layer, K and V)."""
        self.new.copy_(self.new.index_select(2, rows))


class CacheArena:
    """Flat zero-initialised buffers for every bucket's caches (see the module docstring)."""

    def __init__(self, dims: CacheDims, device: torch.device, dtype: torch.dtype) -> None:
        self.dims, self.device, self.dtype = dims, device, dtype
        self.version = 0
        self._buffers = [torch.zeros(0, device=device, dtype=dtype) for _ in range(3)]

    def reserve(self, bucket: Bucket) -> None:
        """Grow the buffers to hold `bucket` (a no-op when they already do)."""
        need = self.dims.sizes(bucket)
        if all(n <= b.numel() for n, b in zip(need, self._buffers)):
            return
        sizes = [max(n, b.numel()) for n, b in zip(need, self._buffers)]
        self._buffers = []  # free the old buffers before allocating the new ones
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._buffers = [torch.zeros(s, device=self.device, dtype=self.dtype) for s in sizes]
        self.version += 1

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def views(self, b: Bucket) -> CacheViews:
        self.reserve(b)
        d = self.dims
        n_prompt, n_new, n_values = d.sizes(b)
        prompt, new, values = self._buffers
        return CacheViews(
            prompt[:n_prompt].view(d.layers, 2, b.batch, d.kv_heads, b.prompt, d.head_dim),
            new[:n_new].view(d.layers, 2, b.rows, d.kv_heads, b.new, d.head_dim),
            values[:n_values].view(d.cross_layers, b.batch, b.images * d.image_rows, d.mmfs_heads, d.mmfs_head_dim),
        )
