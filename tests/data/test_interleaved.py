"""Stage-1 streams: MMC4 zip shards and LAION tars in their real layouts, packing into batches, sharding over
ranks and DataLoader workers, deterministic resumption, probability mixing and bad-sample handling."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deem.data import build_dataset
from deem.data.errors import BadSampleTracker, SampleError
from deem.data.interleaved import LaionSource, MMC4Source
from deem.data.labels import pad_sequences

TF = {"resolution": 8, "resolution_dec": 16, "center_crop": True, "random_flip": True}


def _jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_mmc4(root, n_shards=4, docs_per_shard=3, missing=(), extra_lines=()):
    """MMC4 layout: mmc4_annts/docs_no_face_shard_{i}_v3.jsonl.zip (member without .zip) + flat mmc4_images/."""
    (root / "mmc4_annts").mkdir(parents=True, exist_ok=True)
    (root / "mmc4_images").mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        if s in missing:
            continue
        member = f"docs_no_face_shard_{s}_v3.jsonl"
        lines = []
        for d in range(docs_per_shard):
            texts = [f"shard {s} doc {d} sentence {k}." for k in range(3)]
            infos = []
            for k in range(2):
                name = f"{s:04d}{d:04d}{k:04d}"  # 12 characters, as MMC4 image names
                (root / "mmc4_images" / f"{name}.jpg").write_bytes(_jpeg((40 * s, 40 * d, 100 * k)))
                infos.append({"image_name": f"{name}.jpg", "matched_text_index": 2 - k, "matched_sim": 0.3})
            lines.append(json.dumps({"text_list": texts, "image_info": infos,
                                     "similarity_matrix": [[0.0] * 3, [0.0] * 3]}))
        lines += list(extra_lines)
        with zipfile.ZipFile(root / "mmc4_annts" / f"{member}.zip", "w") as zf:
            zf.writestr(member, "\n".join(lines) + "\n")
    return root


def write_laion(root, n_shards=2, per_shard=6, bad_keys=()):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                files = {"jpg": b"garbage" if key in bad_keys else _jpeg((10 * i, 200, 30 * s)),
                         "json": json.dumps({"caption": f"A Caption {s} {i}"}).encode(), "txt": b"x"}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def mmc4_cfg(root, **kw):
    cfg = {"type": "mmc4", "name": "mmc4", "annotation_root": str(root / "mmc4_annts"),
           "shards": "docs_no_face_shard_{0..3}_v3.jsonl", "image_root": str(root / "mmc4_images"), "seq_len": 48,
           "max_images": 3, "batch_size": 2, "shuffle_buffer": 4, "single_image_drop_prob": 0.0, "transform": TF}
    return {**cfg, **kw}


def test_mmc4_document_rules(tok, tmp_path):
    root = write_mmc4(tmp_path)
    (root / "mmc4_images" / "gone00000000.jpg").unlink(missing_ok=True)
    tracker = BadSampleTracker("mmc4", max_bad_fraction=1.0)
    src = MMC4Source("mmc4", root / "mmc4_annts", "docs_no_face_shard_{0..3}_v3.jsonl", root / "mmc4_images", tok,
                     tracker, single_image_drop_prob=0.0, max_num_images=2)
    doc = {"text_list": ["First one.", "Second  one.", "Third."],
           "image_info": [{"image_name": "000000000001.jpg", "matched_text_index": 2, "matched_sim": 0.5},
                          {"image_name": "000000000000.jpg", "matched_text_index": 0, "matched_sim": 0.5},
                          {"image_name": "000100000000.jpg", "matched_text_index": 1, "matched_sim": 0.1},
                          {"image_name": "gone00000000.jpg", "matched_text_index": 1, "matched_sim": 0.9},
                          {"image_name": "000100010000.jpg", "matched_text_index": 1, "matched_sim": 0.9}],
           "similarity_matrix": [[0]] * 4}  # the 5th image has no row: ignored
    img = tok.image_run
    heads = {f"{img}First one. Second  one.", f"First one.{img}Second  one."}
    tails = {f"{img}Third.", f" Third.{img}"}
    # sentences joined by spaces, then every space next to an image token removed
    expected = {tuple(tok.encode(h + t + "</s>")) for h in heads for t in tails}
    seen = set()
    for seed in range(16):
        out = src.document("k", doc, np.random.default_rng(seed))
        assert len(out.images) == 2, "low-similarity, missing and row-less images are dropped"
        assert tuple(out.ids) in expected, tok.decode(out.ids)
        seen.add(tuple(out.ids))
    assert len(seen) == 4, "each image goes before or after its sentence with p=0.5"
    assert tracker.bad == 16 and "gone00000000" in tracker.last_errors[-1], "the missing image is counted"
    src.max_num_images = 1
    assert {len(src.document("k", doc, np.random.default_rng(s)).images) for s in range(4)} == {1}
    with pytest.raises(SampleError, match="malformed record"):
        src.document("k2", {"text_list": ["a"], "image_info": []}, np.random.default_rng(0))
    single = {"text_list": ["a."], "image_info": [doc["image_info"][1]], "similarity_matrix": [[0]]}
    src.single_image_drop_prob = 1.0
    assert src.document("k3", single, np.random.default_rng(0)) is None


def test_mmc4_shard_list_and_bad_lines(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=6, missing=(4,), extra_lines=["{not json"])
    (root / "mmc4_annts" / "docs_no_face_shard_5_v3.jsonl.zip").write_bytes(b"not a zip")
    ds = build_dataset(mmc4_cfg(root, shards="docs_no_face_shard_{0..5}_v3.jsonl", exclude_shard_ids=[1],
                                max_bad_fraction=1.0), tok, rank=0, world_size=1)
    assert ds.source.shards == [f"docs_no_face_shard_{i}_v3.jsonl" for i in (0, 2, 3, 5)], \
        "excluded and missing shards are not in the real shard list"
    docs = list(ds.documents(0, 0, 1))
    assert len(docs) == 9
    errors = " | ".join(ds.source.tracker.last_errors)
    assert ds.source.tracker.bad == 4 and "malformed record" in errors and "unreadable shard" in errors


def test_stream_batches_match_model_inputs(tok, tmp_path):
    ds = build_dataset(mmc4_cfg(write_mmc4(tmp_path)), tok, rank=0, world_size=1)
    batches = list(ds)
    assert batches
    n = tok.num_img_token
    for b in batches:
        assert b["text_ids"].shape == (2, 48) and b["attention_mask"].shape == (2, 48)
        n_img = int(b["num_image_per_seq"].sum())
        assert b["image_tensors"].shape == (n_img, 3, 8, 8) and b["image_tensors_dec"].shape == (n_img, 3, 16, 16)
        assert int((b["text_ids"] == tok.special.soi_id).sum()) == n_img == b["nearest_bos_idxs"].numel()
        assert int((b["text_ids"] == tok.special.image_id).sum()) == n * n_img
        assert int(b["num_image_per_seq"].max()) <= 3
        labels = b["gt_text_ids"]
        assert not bool(((labels == tok.special.image_id) | (labels == tok.special.bos_id)).any())
        assert b["meta"]["dataset_name"] == "mmc4" and len(b["meta"]["meta"]) == 2
        for row in range(2):
            ids = b["text_ids"][row].tolist()
            bos = [t for t, i in enumerate(ids) if i == tok.special.bos_id]
            socs = [t for t, i in enumerate(ids) if i == tok.special.soi_id]
            for s in socs:
                assert ids[s + 1: s + 1 + n] == [tok.special.image_id] * n
            for s, near in zip(socs, b["nearest_bos_idxs"][sum(b["num_image_per_seq"][:row]):].tolist()):
                assert near == max([p for p in bos if p < s], default=0)


def _consumer_batches(ds, epoch, consumer, n):
    """The text_ids a consumer must produce, computed in this process from the raw packed sequences."""
    return [pad_sequences([s.ids for s in seqs], tok_pad(ds), "right") for _, seqs, _ in
            ds.raw_batches(epoch, consumer, n)]


def tok_pad(ds):
    return ds.tok.special.pad_id


def test_ranks_and_workers_read_disjoint_shards(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=4, docs_per_shard=4)
    cfg = mmc4_cfg(root, seq_len=32, max_images=2)
    keys = []
    for rank in range(2):
        ds = build_dataset(cfg, tok, rank=rank, world_size=2)
        for consumer in (rank * 2, rank * 2 + 1):
            keys += [d.key.split(":")[0] + ":" + d.key.split(":")[1] for d in ds.documents(0, consumer, 4)]
        # a real DataLoader with 2 workers: worker w of rank r is consumer 2r+w
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        got = {}
        for b in loader:
            pos = b["meta"]["position"]
            assert pos["rank"] == rank and pos["num_workers"] == 2
            got.setdefault(pos["consumer"], []).append(b["text_ids"])
        assert sorted(got) == [rank * 2, rank * 2 + 1]
        for consumer, rows in got.items():
            want = _consumer_batches(ds, 0, consumer, 4)
            assert len(rows) == len(want) and all(torch.equal(a, w) for a, w in zip(rows, want))
    assert len(keys) == len(set(keys)) == 16, "every document read exactly once across 2 ranks x 2 workers"


def test_fewer_shards_than_consumers_splits_samples(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=1, docs_per_shard=6)
    cfg = mmc4_cfg(root, shards="docs_no_face_shard_0_v3.jsonl")
    keys = [d.key for c in range(3) for d in build_dataset(cfg, tok, rank=0, world_size=3).documents(0, c, 3)]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 6


def test_epochs_reshuffle_and_resume_is_exact(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=4, docs_per_shard=5)
    cfg = mmc4_cfg(root, seq_len=32, max_images=2)
    ds = build_dataset(cfg, tok, rank=0, world_size=1)
    e0 = [b["text_ids"] for b in ds]
    assert all(torch.equal(a, b["text_ids"]) for a, b in zip(e0, ds)), "deterministic for a seed"
    ds.set_epoch(1)
    assert not all(torch.equal(a, b["text_ids"]) for a, b in zip(e0, ds)), "another epoch reads another order"
    ds.set_epoch(0)

    loader = DataLoader(ds, batch_size=None, num_workers=2)
    full = list(loader)
    assert len(full) >= 4
    for b in full[:3]:
        ds.note_batch(b)
    state = json.loads(json.dumps(ds.state_dict()))  # must survive a JSON round trip
    resumed = build_dataset(cfg, tok, rank=0, world_size=1)
    resumed.load_state_dict(state)
    rest = list(DataLoader(resumed, batch_size=None, num_workers=2))
    assert len(rest) == len(full) - 3
    key = lambda b: (b["meta"]["position"]["consumer"], b["meta"]["position"]["batch_index"])
    want = {key(b): b for b in full[3:]}
    for b in rest:
        ref = want[key(b)]
        assert torch.equal(b["text_ids"], ref["text_ids"]) and torch.equal(b["image_tensors"], ref["image_tensors"])


def test_laion_pairs_truncation_and_bad_samples(tok, tmp_path):
    root = write_laion(tmp_path / "laion", bad_keys=("000000003",))
    tracker = BadSampleTracker("blip", max_bad_fraction=1.0)
    src = LaionSource("blip", root, "{00000..00001}.tar", tok, tracker, seq_len=12)
    records = list(src.records("00000.tar"))
    assert [k for k, _ in records][:2] == ["00000.tar:000000000", "00000.tar:000000001"]
    n = tok.num_img_token
    long_caption = {"__key__": "x", "jpg": _jpeg((1, 2, 3)), "json": json.dumps({"caption": ["Many"] * 30}).encode()}
    heads = set()
    for seed in range(6):
        doc = src.document("x", long_caption, np.random.default_rng(seed))
        assert len(doc.ids) == 12 and len(doc.images) == 1
        if doc.ids[1] == tok.special.soi_id:  # image first: cut at seq_len
            heads.add("image")
            assert doc.ids[-1] != tok.special.eos_id
        else:  # text first: keep the head and the image run + EOS
            heads.add("text")
            assert doc.ids[-(n + 2):] == [tok.special.soi_id, *[tok.special.image_id] * n, tok.special.eos_id]
    assert heads == {"image", "text"}
    short = src.document("y", {"jpg": _jpeg((1, 2, 3)), "json": b'{"caption": "A Cat"}'}, np.random.default_rng(0))
    assert "a cat" in tok.decode(short.ids), "captions are lower-cased"
    with pytest.raises(SampleError, match="incomplete sample"):
        src.document("z", {"json": b"{}"}, np.random.default_rng(0))
    with pytest.raises(SampleError, match="corrupt image"):
        src.document("w", dict(records[3][1]), np.random.default_rng(0))
    data = (root / "00000.tar").read_bytes()
    (root / "00001.tar").write_bytes(data[: 512 * 9 + 10])  # a truncated download, cut inside a member
    before = tracker.bad
    assert 0 < len(list(src.records("00001.tar"))) < 6
    assert tracker.bad > before and "unreadable tar content" in tracker.last_errors[-1]


def test_random_mix_longest(tok, tmp_path):
    mmc4 = write_mmc4(tmp_path / "mmc4", n_shards=4, docs_per_shard=6)
    laion = write_laion(tmp_path / "laion", n_shards=2, per_shard=4)
    cfg = {"type": "random_mix", "probs": [2.0, 1.0], "sampling_type": "longest", "seed": 1, "datasets": [
        mmc4_cfg(mmc4, seq_len=32, max_images=2),
        {"type": "laion", "name": "blip", "data_root": str(laion), "shards": "{00000..00001}.tar", "seq_len": 32,
         "max_images": 2, "batch_size": 2, "shuffle_buffer": 3, "transform": TF}]}
    ds = build_dataset(cfg, tok, rank=0, world_size=1)
    names = [b["meta"]["dataset_name"] for b in ds]
    assert set(names) == {"mmc4", "blip"}
    single = {n: len(list(build_dataset(c, tok, rank=0, world_size=1))) for n, c in
              zip(("mmc4", "blip"), cfg["datasets"])}
    assert all(names.count(n) >= single[n] for n in single), "each source is read to its end at least once"
    assert names == [b["meta"]["dataset_name"] for b in ds], "deterministic"
    for b in list(ds)[:2]:
        ds.note_batch(b)
    again = build_dataset(cfg, tok, rank=0, world_size=1)
    again.load_state_dict(ds.state_dict())
    assert [b["meta"]["dataset_name"] for b in again] == names[2:]
