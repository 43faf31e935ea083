"""Glue between text and images (spec/model.md §6.3, §6.4, §7.2, §7.4, §9.1, §9.2): inserting image
embeddings into the token sequence, the per-token image visibility, packing image features per
sequence for the LLM's cross-attention, and the per-image context of the image decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deem.tokens import IGNORE_INDEX


def scatter_image_embeddings(
    text_embeds: torch.Tensor, text_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Replace, in row-major order, the embeddings at every `<image>` token with the rows of
    `image_embeds` [B_I, n_tokens, C]. The counts must match exactly."""
    slots = text_ids == image_token_id
    rows = image_embeds.reshape(-1, image_embeds.shape[-1])
    n_slots = int(slots.sum())
    if n_slots != rows.shape[0]:
        raise ValueError(
            f"text_ids hold {n_slots} <image> tokens but the images give {rows.shape[0]} embeddings "
            f"({image_embeds.shape[0]} images x {image_embeds.shape[1]} tokens)"
        )
    out = text_embeds.to(rows.dtype).clone()
    out[slots] = rows
    return out


def add_soi_embedding(
    embeds: torch.Tensor, text_ids: torch.Tensor, soi_embedding: torch.Tensor, soi_token_id: int
) -> torch.Tensor:
    """`embeds[<soi>] += soi_embedding` (a learnable [1, C] vector, zero at init)."""
    mask = (text_ids == soi_token_id).unsqueeze(-1).to(embeds.dtype)
    return embeds + mask * soi_embedding.to(embeds.dtype).view(1, 1, -1)


def image_start_positions(text_ids: torch.Tensor, num_image_per_seq: torch.Tensor, soi_token_id: int) -> torch.Tensor:
    """[B, N_max] position of the first `<image>` token of every image (its `<soi>` + 1), -1 for empty slots."""
    B = text_ids.shape[0]
    counts = num_image_per_seq.tolist()
    n_max = max(counts) if counts else 0
    pos = torch.full((B, n_max), -1, dtype=torch.long, device=text_ids.device)
    for b in range(B):
        soi = (text_ids[b] == soi_token_id).nonzero(as_tuple=True)[0]
        if soi.numel() != counts[b]:
            raise ValueError(
                f"row {b}: num_image_per_seq says {counts[b]} images but text_ids hold {soi.numel()} <soi> tokens"
            )
        pos[b, : counts[b]] = soi + 1
    return pos


def cross_attention_visibility(
    text_ids: torch.Tensor, num_image_per_seq: torch.Tensor, soi_token_id: int, bos_token_id: int
) -> torch.Tensor:
    """[B, L, N_max] float 0/1: token t sees image j iff the image starts after the latest `<s>` at or
    before t and at or before t (spec §6.4)."""
    B, L = text_ids.shape
    start = image_start_positions(text_ids, num_image_per_seq, soi_token_id)  # [B, N]
    t = torch.arange(L, device=text_ids.device)
    bos = torch.where(text_ids == bos_token_id, t.expand(B, L), torch.full_like(text_ids, -1))
    last_bos = bos.cummax(dim=1).values  # [B, L]
    s = start[:, None, :]
    visible = (s > last_bos[:, :, None]) & (s <= t[None, :, None]) & (s != -1)
    return visible.float()


def pack_image_features(levels: list[torch.Tensor], num_image_per_seq: torch.Tensor) -> torch.Tensor:
    """Images' feature maps (each level [B_I, C, H, W], images sequence-major) to the per-sequence
    layout of the cross-attention: [B, N_max, sum_l H_l W_l, C] (zeros in empty slots)."""
    counts = num_image_per_seq.tolist()
    B, n_max = len(counts), max(counts) if counts else 0
    flat = torch.cat([lvl.flatten(2).transpose(1, 2) for lvl in levels], dim=1)  # [B_I, S, C]
    if flat.shape[0] != sum(counts):
        raise ValueError(f"num_image_per_seq sums to {sum(counts)} images but the features hold {flat.shape[0]}")
    out = flat.new_zeros(B, n_max, *flat.shape[1:])
    start = 0
    for b, n in enumerate(counts):
        out[b, :n] = flat[start : start + n]
        start += n
    return out


def image_context(
    hidden: torch.Tensor, text_ids: torch.Tensor, soi_token_id: int, nearest_bos_idxs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image (one per `<soi>`, row-major): the LLM states from its nearest `<s>` to its `<soi>`
    inclusive, reversed (index 0 is the `<soi>` state), padded (spec §9.1).

    Returns context [B_I, L_max, C], mask [B_I, L_max] (long), and the row of every image [B_I]."""
    rows, cols = (text_ids == soi_token_id).nonzero(as_tuple=True)
    if nearest_bos_idxs is None:
        nearest_bos_idxs = torch.zeros_like(cols)
    if nearest_bos_idxs.shape[0] != cols.shape[0]:
        raise ValueError(f"nearest_bos_idxs has {nearest_bos_idxs.shape[0]} entries for {cols.shape[0]} images")
    lengths = cols - nearest_bos_idxs + 1
    L_max = int(lengths.max()) if lengths.numel() else 0
    context = hidden.new_zeros(len(cols), L_max, hidden.shape[-1])
    mask = torch.zeros(len(cols), L_max, dtype=torch.long, device=hidden.device)
    for i in range(len(cols)):
        seg = hidden[rows[i], int(nearest_bos_idxs[i]) : int(cols[i]) + 1].flip(0)
        context[i, : seg.shape[0]] = seg
        mask[i, : seg.shape[0]] = 1
    return context, mask, rows


def previous_image_features(
    levels: list[torch.Tensor], text_ids: torch.Tensor, soi_token_id: int, nearest_bos_idxs: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The image-decoder MMFS context (spec §9.2): each image may use only the immediately preceding image,
    when that image's `<soi>` lies at or after this image's nearest `<s>` in the same row.

    Returns per level [B_I, 1, C, H, W] (zeros without a predecessor) and the mask [B_I, 1] (long)."""
    L = text_ids.shape[1]
    rows, cols = (text_ids == soi_token_id).nonzero(as_tuple=True)
    flat_soi = rows * L + cols
    bos = torch.zeros_like(cols) if nearest_bos_idxs is None else nearest_bos_idxs
    flat_bos = rows * L + bos
    n = len(cols)
    has_prev = torch.zeros(n, dtype=torch.bool, device=text_ids.device)
    if n > 1:
        has_prev[1:] = flat_bos[1:] <= flat_soi[:-1]
    out = []
    for lvl in levels:
        prev = torch.zeros_like(lvl)
        if n > 1:
            prev[1:] = lvl[:-1]
        prev = prev * has_prev.view(-1, 1, 1, 1).to(lvl.dtype)
        out.append(prev[:, None])
    return out, has_prev.long()[:, None]


def num_text_targets(gt_text_ids: torch.Tensor) -> int:
    """How many positions `text_loss` scores (labels shifted by one, -100 ignored)."""
    return int((gt_text_ids[:, 1:] != IGNORE_INDEX).sum())


def text_loss(
    logits: torch.Tensor, gt_text_ids: torch.Tensor, denominator: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy in fp32: position t predicts gt_text_ids[t + 1] (-100 = ignored). The mean over
    this batch's targets, or their sum divided by `denominator` (a token count over several batches and ranks,
    so that every target weighs the same however the global batch is split)."""
    targets = gt_text_ids[:, 1:]
    if num_text_targets(gt_text_ids) == 0:
        return logits.sum() * 0.0
    flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    if denominator is None:
        return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX)
    summed = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / denominator


def num_parameters(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
