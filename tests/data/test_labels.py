"""Label rules of spec model.md §7.4, checked token by token."""

from __future__ import annotations

import torch

from deem.data.labels import IGNORE_INDEX, build_labels, nearest_bos_indices, pad_sequences
from deem.data.tokenizer import SpecialTokens

SP = SpecialTokens(bos_id=1, eos_id=2, pad_id=0, soi_id=90, image_id=91, ref_id=92, ref_end_id=93, box_id=94,
                   box_end_id=95)
X = IGNORE_INDEX


def test_label_rules_token_by_token():
    #        bos soi img img  t1  t2 eos bos  t3 soi img img  t4 eos pad
    ids = [1, 90, 91, 91, 10, 11, 2, 1, 12, 90, 91, 91, 13, 2, 0]
    att = [1] * 14 + [0]
    trainable = [1] * 15
    labels = build_labels(torch.tensor([ids]), torch.tensor([att]), torch.tensor([trainable]).bool(), SP)[0].tolist()
    # bos targets, soi right after bos, image tokens and padding are never learned
    assert labels == [X, X, X, X, 10, 11, 2, X, 12, 90, X, X, 13, 2, X]


def test_prompt_masking_and_pad_equal_to_vocab_token():
    # pad id 12 is also a real token (as 31999 is for Vicuna): only attention decides what is padding
    sp = SpecialTokens(1, 2, 12, 90, 91, 92, 93, 94, 95)
    ids = torch.tensor([[1, 5, 12, 7, 2, 12]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0]])
    trainable = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    assert build_labels(ids, att, trainable, sp)[0].tolist() == [X, X, 12, 7, 2, X]


def test_ignore_noimage_cond_loss():
    # caption before its image (text->image pair) then image before caption (image->text pair)
    ids = [1, 10, 11, 90, 91, 2, 1, 90, 91, 12, 13, 2]
    att = [1] * len(ids)
    labels = build_labels(torch.tensor([ids]), torch.tensor([att]), torch.ones(1, len(ids)).bool(), SP,
                          ignore_noimage_cond_loss=True)[0].tolist()
    assert labels == [X, X, X, 90, X, 2, X, X, X, 12, 13, 2]


def test_padding_and_nearest_bos():
    assert pad_sequences([[1, 2, 3], [4]], 0, "left").tolist() == [[1, 2, 3], [0, 0, 4]]
    assert pad_sequences([[1, 2, 3], [4]], 9, "right").tolist() == [[1, 2, 3], [4, 9, 9]]
    assert nearest_bos_indices([5, 90, 91, 1, 7, 90, 91, 1, 90], SP) == [0, 3, 7]
