"""Packing tokenised documents into fixed-length training sequences (spec data-eval.md §1.1 "Packing")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deem.data.tokenizer import SpecialTokens


@dataclass
class Document:
    """A tokenised sample: ids start with `<s>` and end with `</s>`; `images[k]` belongs to the k-th `<soi>`."""

    ids: list[int]
    images: list[Any]
    key: str = ""


@dataclass
class PackedSequence:
    ids: list[int]
    images: list[Any]
    meta: dict[str, Any] = field(default_factory=dict)


class SequencePacker:
    """Append documents to a running buffer and cut `seq_len`-token sequences from its front.

    - at most `max_images` image runs per sequence: `level="image"` cuts right after the last allowed run;
      `level="sample"` cuts at the last `<s>` before the first extra image if that lies after the last
      allowed image, else directly before the first extra `<soi>`;
    - a cut never splits an image run: `image` level cuts before the run's `<soi>`, `sample` level at the last
      `<s>` before it (or before the `<soi>` when the sample starts the buffer);
    - sequences without images are dropped; leftovers stay in the buffer (so a sequence may start without BOS).
    """

    def __init__(self, special: SpecialTokens, num_img_token: int, seq_len: int = 2048, max_images: int = 15,
                 level: str = "image"):
        if level not in ("image", "sample"):
            raise ValueError(f"truncation level must be 'image' or 'sample', got {level!r}")
        if seq_len <= num_img_token + 2:
            raise ValueError(f"seq_len {seq_len} cannot hold one image run of {num_img_token + 1} tokens")
        self.special, self.run = special, num_img_token + 1
        self.seq_len, self.max_images, self.level = seq_len, max_images, level
        self.ids: list[int] = []
        self.images: list[Any] = []
        self.dropped_no_image = 0

    def add(self, doc: Document) -> list[PackedSequence]:
        self.ids.extend(doc.ids)
        self.images.extend(doc.images)
        out = []
        while len(self.ids) >= self.seq_len:
            seq = self._cut()
            if seq is not None:
                out.append(seq)
        return out

    def _soi_positions(self, limit: int) -> list[int]:
        soi = self.special.soi_id
        return [t for t in range(min(limit, len(self.ids))) if self.ids[t] == soi]

    def _last_bos(self, before: int) -> int:
        for t in range(min(before, len(self.ids)) - 1, -1, -1):
            if self.ids[t] == self.special.bos_id:
                return t
        return -1

    def _cut(self) -> PackedSequence | None:
        cut = self.seq_len
        socs = self._soi_positions(len(self.ids))
        inside = [p for p in socs if p < cut]
        if len(inside) > self.max_images:
            last_ok, first_extra = inside[self.max_images - 1], inside[self.max_images]
            if self.level == "image":
                cut = last_ok + self.run
            else:
                bos = self._last_bos(first_extra)
                cut = bos if bos > last_ok else first_extra
        inside = [p for p in socs if p < cut]
        if inside and inside[-1] + self.run > cut:  # the last image run would be truncated
            p = inside[-1]
            if self.level == "sample":
                bos = self._last_bos(p + 1)
                cut = bos if bos > 0 else p
            else:
                cut = p
        if cut <= 0:  # a run at position 0 longer than the sequence cannot happen (seq_len > run); be safe
            cut = self.seq_len
        n_img = sum(1 for p in socs if p < cut)
        ids, self.ids = self.ids[:cut], self.ids[cut:]
        images, self.images = self.images[:n_img], self.images[n_img:]
        if n_img == 0:
            self.dropped_no_image += 1
            return None
        return PackedSequence(ids, images, self._meta(ids, n_img))

    def _meta(self, ids: list[int], n_img: int) -> dict[str, Any]:
        bos, soi = self.special.bos_id, self.special.soi_id
        uncond, last_bos = 0, None
        for t, tok in enumerate(ids):
            if tok == bos:
                last_bos = t
            elif tok == soi and last_bos is not None and t - last_bos <= 1:
                uncond += 1
        return {
            "is_truncated": ids[-1] != self.special.eos_id,
            "is_first_token_image": ids[0] == soi or (len(ids) > 1 and ids[0] == bos and ids[1] == soi),
            "uncond_image_cnt": uncond,
            "image_cnt": n_img,
        }
