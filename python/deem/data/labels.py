"""Label construction and padding shared by every collator.

Labels are returned *unshifted* as `gt_text_ids` (same shape as `text_ids`, -100 where no loss): the model
uses `gt_text_ids[:, 1:]` as the targets of positions `0..L-2` (spec model.md §7.4). The rules of §7.4
are applied here, in one place, so that the data layer fully defines which tokens are learned:
  - tokens outside a trainable span (prompts) are -100;
  - `<|sniffer|>` targets, padding (attention_mask == 0) and `<s>` targets are -100;
  - a `<|startofimage|>` directly after `<s>` is -100 (no learning to open an image right after BOS);
  - optionally (`ignore_noimage_cond_loss`) every token whose latest `<soi>` is missing or precedes the latest
    `<s>` is -100 (text not conditioned on an image, e.g. caption-before-image in LAION pairs).
Padding is masked through the attention mask, not by comparing with the pad id, so a pad id that is also a
real vocabulary token (31999 for Vicuna) is never confused with padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deem.tokens import IGNORE_INDEX, SpecialTokens

__all__ = ["IGNORE_INDEX", "build_labels", "image_conditioned", "nearest_bos_indices", "pad_sequences"]


def build_labels(
    text_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trainable: torch.Tensor,
    special: SpecialTokens,
    ignore_noimage_cond_loss: bool = False,
) -> torch.Tensor:
    """`gt_text_ids` from `text_ids` [B, L], `attention_mask` [B, L] and a bool `trainable` mask [B, L]."""
    labels = text_ids.clone()
    keep = trainable.bool() & attention_mask.bool()
    keep &= text_ids != special.image_id
    keep &= text_ids != special.bos_id
    after_bos = torch.zeros_like(keep)
    after_bos[:, 1:] = (text_ids[:, :-1] == special.bos_id) & (text_ids[:, 1:] == special.soi_id)
    keep &= ~after_bos
    if ignore_noimage_cond_loss:
        keep &= image_conditioned(text_ids, special)
    labels[~keep] = IGNORE_INDEX
    return labels


def image_conditioned(text_ids: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    """True where the most recent `<soi>` (the token itself included) lies at or after the most recent `<s>`."""
    pos = torch.arange(text_ids.shape[1], device=text_ids.device).expand_as(text_ids)
    neg = torch.full_like(pos, -1)
    last_bos = torch.cummax(torch.where(text_ids == special.bos_id, pos, neg), dim=1).values
    last_soi = torch.cummax(torch.where(text_ids == special.soi_id, pos, neg), dim=1).values
    return (last_soi >= 0) & (last_soi >= last_bos)


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right", length: int | None = None
) -> torch.Tensor:
    """Stack int sequences into [B, L] (L = longest unless given), padding on `side` ('right' or 'left')."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in seqs), default=0) if length is None else length
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(list(s), dtype=torch.long)[:width]
        if side == "right":
            out[i, : len(s)] = s
        else:
            out[i, width - len(s):] = s
    return out


def nearest_bos_indices(ids: Sequence[int], special: SpecialTokens) -> list[int]:
    """For each `<soi>` of a sequence, the index of the closest preceding `<s>` (0 if none)."""
    out, last_bos = [], 0
    for t, tok in enumerate(ids):
        if tok == special.bos_id:
            last_bos = t
        elif tok == special.soi_id:
            out.append(last_bos)
    return out
