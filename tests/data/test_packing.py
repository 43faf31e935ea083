"""Sequence packing rules (spec §1.1): image limit per sequence, no split image runs, image vs sample level."""

from __future__ import annotations

from deem.data.packing import Document, SequencePacker
from deem.data.tokenizer import SpecialTokens

SP = SpecialTokens(bos_id=1, eos_id=2, pad_id=0, soi_id=90, image_id=91, ref_id=92, ref_end_id=93, box_id=94,
                   box_end_id=95)
RUN = [90, 91, 91]  # soi + 2 image tokens


def doc(*parts, key="d"):
    """Build a document from text token ids and 'I' markers for images."""
    ids, images = [1], []
    for p in parts:
        if p == "I":
            ids += RUN
            images.append(f"{key}-img{len(images)}")
        else:
            ids += [p]
    return Document([*ids, 2], images, key)


def test_cut_never_splits_an_image_run_image_level():
    p = SequencePacker(SP, num_img_token=2, seq_len=8, max_images=15, level="image")
    # 1 10 11 12 13 14 [90 91 | 91] ... : the run at 6..8 would be cut at 8
    out = p.add(doc(10, 11, 12, 13, 14, "I", 15, "I", 16, 17, 18))
    # the first cut moves back to 6 ([1 10 11 12 13 14], no image: dropped); the next holds both runs whole
    assert p.dropped_no_image == 1
    assert [s.ids for s in out] == [[*RUN, 15, *RUN, 16]]
    assert out[0].images == ["d-img0", "d-img1"] and not out[0].meta["uncond_image_cnt"]
    assert p.ids == [17, 18, 2] and p.images == []


def test_image_level_limit_cuts_after_last_allowed_run():
    p = SequencePacker(SP, num_img_token=2, seq_len=16, max_images=2, level="image")
    out = p.add(doc("I", "I", "I", 10, 11, 12, 13, 14, 15, 16))
    assert out[0].ids == [1, *RUN, *RUN] and out[0].images == ["d-img0", "d-img1"]
    assert out[0].meta["image_cnt"] == 2 and out[0].meta["is_truncated"]
    assert out[0].meta["is_first_token_image"] and out[0].meta["uncond_image_cnt"] == 1
    assert p.ids[:3] == RUN and p.images == ["d-img2"], "the rest goes back to the buffer"


def test_sample_level_limit_cuts_at_sample_boundary():
    p = SequencePacker(SP, num_img_token=2, seq_len=20, max_images=2, level="sample")
    out = []
    for k in range(4):  # four pairs: <s> img caption </s> (6 tokens each)
        out += p.add(doc("I", 10 + k, key=f"s{k}"))
    assert len(out) == 1
    assert out[0].ids == [1, *RUN, 10, 2, 1, *RUN, 11, 2] and out[0].images == ["s0-img0", "s1-img0"]
    assert p.ids[0] == 1 and p.images == ["s2-img0", "s3-img0"], "the third pair starts the next sequence"


def test_sample_level_truncated_run_moves_back_to_bos():
    p = SequencePacker(SP, num_img_token=2, seq_len=9, max_images=15, level="sample")
    out = p.add(doc(10, 11, "I", key="a"))  # 7 tokens
    out += p.add(doc("I", 12, key="b"))  # the run of b at 8..10 would be cut at 9
    assert out[0].ids == [1, 10, 11, *RUN, 2] and out[0].images == ["a-img0"]
    assert p.ids[0] == 1 and p.images == ["b-img0"]


def test_sequences_without_images_are_dropped():
    p = SequencePacker(SP, num_img_token=2, seq_len=6, max_images=15, level="image")
    assert p.add(doc(10, 11, 12, 13, 14, 15, 16)) == []
    assert p.dropped_no_image == 1
