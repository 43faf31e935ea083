"""MaskPooling: region tokens from a mask and the multi-scale maps (DEEM-MASK, spec §10.2).

Parameter names equal the original ``visual_tokenizer.feature_extractor.*``:
``mask_linear.layers.{0,1,2}.{weight,bias}`` (the shape MLP) and ``mask_feat_linear.{weight,bias}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(x: torch.Tensor, mask: torch.Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who}: features must be [B, C, H, W], got shape {tuple(x.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0]:
        raise ValueError(f"{who}: mask must be [B, 1, R, R'] with B={x.shape[0]}, got shape {tuple(mask.shape)}")


def binary_mask_like(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1[bilinear(mask → x's H×W, align_corners=False) > 0]`` as ``[B, 1, H, W]`` in x's dtype.

    The resize is skipped when the sizes already agree (where it is the identity anyway).
    """
    _check_pair(x, mask, "binary_mask_like")
    m = mask.float()
    if m.shape[-2:] != x.shape[-2:]:
        m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return (m > 0).to(x.dtype)


class _MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskPooling(nn.Module):
    """Region features and tokens from a region mask.

    Args:
        feat_dim: channel width of the multi-scale maps (1024).
        width: width of the output tokens (the Q-Former input width, 1024).
        hidden: hidden width of the shape MLP (1024).
        mask_size: side the mask is resized to for the shape MLP (112).
        with_tokens: build the token parameters (``mask_align``); without them only
            :meth:`extract_region` and :meth:`extract` are usable and the module has no parameters.
    """

    def __init__(
        self,
        feat_dim: int = 1024,
        width: int = 1024,
        hidden: int = 1024,
        mask_size: int = 112,
        with_tokens: bool = True,
    ) -> None:
        super().__init__()
        self.feat_dim, self.width, self.hidden, self.mask_size = feat_dim, width, hidden, mask_size
        self.with_tokens = with_tokens
        if with_tokens:
            self.mask_linear = _MLP([mask_size * mask_size, hidden, hidden, width])
            self.mask_feat_linear = nn.Linear(feat_dim, width)

    @staticmethod
    def extract_region(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features outside the region zeroed: ``x · 1[resize(mask) > 0]``, ``[B, C, H, W]``."""
        return x * binary_mask_like(x, mask)

    @staticmethod
    def extract(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked average ``Σ_hw x·m / (Σ_hw m + 1e-8)`` with the binarised resized mask -> ``[B, C]``.

        An empty region gives zeros.
        """
        m = binary_mask_like(x, mask)
        return (x * m).sum(dim=(-2, -1)) / (m.sum(dim=(-2, -1)) + 1e-8)

    def forward(self, multiscale_feats: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, feat_dim, H_l, W_l]`` (pos-augmented) and mask ``[B, 1, R, R]`` -> ``[B, L + 1, width]``.

        Tokens: ``mask_feat_linear(extract(F_l, mask))`` for each level l (shared Linear), then the
        shape token ``MLP(flatten(bilinear(mask → mask_size², not binarised)))``; 5 tokens for 4 levels.
        """
        if not self.with_tokens:
            raise RuntimeError("MaskPooling: built with with_tokens=False; forward needs the token layers")
        if len(multiscale_feats) == 0:
            raise ValueError("MaskPooling: multiscale_feats is empty")
        tokens = []
        for level, f in enumerate(multiscale_feats):
            if f.dim() != 4 or f.shape[1] != self.feat_dim:
                raise ValueError(
                    f"MaskPooling: multiscale_feats[{level}] must be [B, {self.feat_dim}, H, W], "
                    f"got shape {tuple(f.shape)}"
                )
            tokens.append(self.mask_feat_linear(self.extract(f, mask).to(self.mask_feat_linear.weight.dtype)))
        w = self.mask_linear.layers[0].weight
        shape = F.interpolate(mask.float(), size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)
        tokens.append(self.mask_linear(shape.flatten(1).to(w.dtype)))
        return torch.stack(tokens, dim=1)
