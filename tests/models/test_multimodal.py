"""Text/image glue against hand-worked examples of spec/model.md §6.4, §7, §9."""

import pytest
import torch

from deem.models.multimodal import (
    add_soi_embedding,
    cross_attention_visibility,
    image_context,
    pack_image_features,
    previous_image_features,
    scatter_image_embeddings,
    text_loss,
)
from deem.models.positions import sincos_pos_embed_1d

BOS, SOI, IMG, PAD = 1, 9, 8, 0


def test_scatter_and_soi():
    ids = torch.tensor([[BOS, SOI, IMG, IMG, 5], [BOS, 5, SOI, IMG, IMG]])
    emb = torch.zeros(2, 5, 3)
    imgs = torch.arange(12.0).view(2, 2, 3)
    out = scatter_image_embeddings(emb, ids, imgs, IMG)
    assert torch.equal(out[0, 2], imgs[0, 0]) and torch.equal(out[0, 3], imgs[0, 1])
    assert torch.equal(out[1, 3], imgs[1, 0]) and torch.equal(out[1, 4], imgs[1, 1])
    assert out[0, 4].abs().sum() == 0
    soi = torch.tensor([[1.0, 2.0, 3.0]])
    out2 = add_soi_embedding(out, ids, soi, SOI)
    assert torch.equal(out2[0, 1], soi[0]) and torch.equal(out2[1, 2], soi[0])
    with pytest.raises(ValueError, match="4 <image> tokens but the images give 2"):
        scatter_image_embeddings(emb, ids, imgs[:1], IMG)


def test_visibility_follows_documents_and_image_starts():
    # row 0: <s> A <soi> I I B <s> C <soi> I ; row 1: <s> <soi> I pad ...
    ids = torch.tensor([
        [BOS, 5, SOI, IMG, IMG, 6, BOS, 7, SOI, IMG],
        [BOS, SOI, IMG, 5, PAD, PAD, PAD, PAD, PAD, PAD],
    ])
    vis = cross_attention_visibility(ids, torch.tensor([2, 1]), SOI, BOS)
    assert vis.shape == (2, 10, 2)
    # image 0 of row 0 starts at 3: seen by tokens 3..5 (the <soi> at 2 does not see it), not after the 2nd <s>
    assert vis[0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]
    # image 1 of row 0 starts at 9
    assert vis[0, :, 1].tolist() == [0] * 9 + [1]
    assert vis[1, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert vis[1, :, 1].sum() == 0  # empty slot
    with pytest.raises(ValueError, match="row 1: num_image_per_seq says 2 images"):
        cross_attention_visibility(ids, torch.tensor([2, 2]), SOI, BOS)


def test_pack_image_features():
    lv0 = torch.arange(3 * 2 * 2 * 2.0).view(3, 2, 2, 2)  # B_I=3, C=2, 2x2
    lv1 = torch.arange(3 * 2 * 1 * 1.0).view(3, 2, 1, 1) + 100
    packed = pack_image_features([lv0, lv1], torch.tensor([2, 1]))
    assert packed.shape == (2, 2, 5, 2)
    assert torch.equal(packed[0, 1, :4], lv0[1].flatten(1).T)
    assert torch.equal(packed[0, 1, 4], lv1[1, :, 0, 0])
    assert torch.equal(packed[1, 0, 4], lv1[2, :, 0, 0])
    assert packed[1, 1].abs().sum() == 0


def test_image_context_is_reversed_from_soi_to_bos():
    ids = torch.tensor([[BOS, 5, SOI, IMG, BOS, SOI, IMG]])
    h = torch.arange(7.0).view(1, 7, 1)
    ctx, mask, rows = image_context(h, ids, SOI, torch.tensor([0, 4]))
    assert ctx[:, :, 0].tolist() == [[2, 1, 0], [5, 4, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert rows.tolist() == [0, 0]


def test_previous_image_features_only_within_the_document():
    ids = torch.tensor([[BOS, SOI, IMG, SOI, IMG, BOS, SOI, IMG]])
    feats = [torch.arange(3.0).view(3, 1, 1, 1) + 1]
    prev, mask = previous_image_features(feats, ids, SOI, torch.tensor([0, 0, 5]))
    assert mask.tolist() == [[0], [1], [0]]
    assert prev[0].shape == (3, 1, 1, 1, 1)
    assert prev[0].flatten().tolist() == [0, 1, 0]


def test_sincos_1d():
    t = sincos_pos_embed_1d(6, torch.arange(4))
    assert torch.allclose(t[2, 0], torch.tensor(2.0).sin()) and torch.allclose(t[2, 3], torch.tensor(2.0).cos())
    assert torch.allclose(t[3, 1], torch.tensor(3 * 10000 ** (-1 / 3)).sin())


def test_text_loss_shifts_and_ignores():
    logits = torch.randn(1, 4, 10)
    gt = torch.tensor([[-100, 3, -100, 7]])
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([3, 7]))
    assert torch.allclose(text_loss(logits, gt), expected)
    assert text_loss(logits, torch.full_like(gt, -100)) == 0
