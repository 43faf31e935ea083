"""Bad input in the real on-disk formats, per sample: decompression bombs, oversized images, non-UTF-8 bytes,
byte-order marks, 16-bit and transparent images, and sources with nothing readable."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from deem.data import build_dataset
from deem.data.errors import BadSampleTracker, DataError, NoValidSamples, SampleError
from deem.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_image, to_rgb
from deem.data.interleaved import LaionSource
from deem.data.records import read_json, read_jsonl
from tests.data.conftest import write_image, write_json
from tests.data.test_interleaved import TF, _jpeg, mmc4_cfg, write_laion, write_mmc4


# ------------------------------------------------------------------------------------------- PNG files by hand
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, idat: bytes, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A PNG with the given header and compressed image data (which may not match the header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """A few hundred bytes declaring 100000 x 100000 pixels (over twice Pillow's own limit)."""
    return png_bytes(100_000, 100_000, zlib.compress(b"\x00" * 64))


def big_png(side: int = 12000) -> bytes:
    """A valid black 1-bit PNG of side x side pixels: 144 MP for 12000, above our 64 MP default and between
    Pillow's warning (89.5 MP) and error (179 MP) thresholds, so Pillow alone would decode it in full."""
    row = b"\x00" + bytes((side + 7) // 8)
    return png_bytes(side, side, zlib.compress(row * side, 9))


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ images
def test_decompression_bomb_is_one_skipped_sample(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 300
    with pytest.raises(SampleError, match=r"ds \[k\]: decompression bomb: .*bomb.png") as err:
        load_image(path, "ds", "k")
    assert err.value.kind == "decompression bomb"
    with pytest.raises(SampleError, match="decompression bomb"):
        load_image(path.read_bytes(), "ds", "k", max_pixels=None)  # Pillow's own guard stays when ours is off


def test_oversized_image_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(big_png())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            assert img.size == (12000, 12000)
        assert DEFAULT_MAX_IMAGE_PIXELS < 12000 * 12000 < 2 * Image.MAX_IMAGE_PIXELS
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither Pillow's DecompressionBombWarning nor anything else escapes
        with pytest.raises(SampleError, match=r"image too large: .*big.png is 12000x12000 = 144000000 pixels > "
                                              r"max_image_pixels 64000000") as err:
            load_image(path, "ds", "k")
    assert err.value.kind == "image too large" and decoded == [], "refused before any decoding"
    small = write_image(tmp_path / "small.png", size=(40, 30))
    with pytest.raises(SampleError, match="1200 pixels > max_image_pixels 1000"):
        load_image(small, "ds", "k", max_pixels=1000)
    assert load_image(small, "ds", "k", max_pixels=1200).size == (40, 30)
    assert decoded and set(decoded) == {(40, 30)}, "an image within the limit is decoded"


def test_pixel_limit_from_the_data_and_dataset_config(tmp_path, tok):
    from deem.data.config import load_data_config

    for i in range(3):
        write_image(tmp_path / "coco" / f"{i}.jpg", size=(40, 30) if i else (400, 300))
    ann = write_json(tmp_path / "ann.json", [{"image": f"{i}.jpg", "caption": "c"} for i in range(3)])
    entry = {"type": "coco_karpathy", "name": "cap", "annotation": str(ann), "image_root": str(tmp_path / "coco"),
             "transform": TF, "max_bad_fraction": 1.0}
    assert build_dataset(entry).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    cfg = load_data_config({"max_image_pixels": 100_000, "train": [entry, {**entry, "name": "own",
                                                                            "max_image_pixels": 10}]})
    limited, own = (build_dataset(e) for e in cfg["train"])
    assert limited.max_image_pixels == 100_000 and own.max_image_pixels == 10
    assert [limited[i]["index"] for i in range(3)] == [1, 1, 2], "the 400x300 image is skipped, the next served"
    assert limited.tracker.reasons == {"image too large": 1}
    mixture = build_dataset({"type": "concat", "max_image_pixels": 5, "datasets": [entry]})
    assert mixture.datasets[0].max_image_pixels == 5, "children inherit the limit"
    with pytest.raises(DataError, match="max_image_pixels must be"):
        build_dataset({**entry, "max_image_pixels": "big"})


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 200, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(png_of(Image.fromarray(values)))
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # I;16 (or I with older Pillow)
    rgb = np.asarray(load_image(path, "ds", "k")).astype(int)
    assert rgb.shape == (1, 5, 3) and (rgb == rgb[..., :1]).all()
    assert rgb[0, :, 0].tolist() == [0, 1, 1, 128, 255], "v * 255 / 65535, rounded: 200/65535 is ~0, not 200/255"
    big_endian = Image.frombytes("I;16B", (2, 1), struct.pack(">HH", 200, 65535))
    as_int32 = Image.fromarray(np.array([[200, 65535, 70000, -5]], dtype=np.int32))
    assert as_int32.mode == "I"
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [1, 255]
    assert np.asarray(to_rgb(as_int32))[0, :, 0].tolist() == [1, 255, 255, 0]


def test_other_modes_become_correct_rgb(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # index 0 (stored black) is transparent
    path = tmp_path / "p.png"
    path.write_bytes(png_of(pal))
    got = np.asarray(load_image(path, "ds", "k")).tolist()
    assert got == [[[255, 255, 255], [200, 10, 10]]], "transparent pixels show the background, not stored black"

    rgba = Image.frombytes("RGBA", (3, 1), bytes([10, 20, 30, 0, 10, 20, 30, 255, 0, 0, 0, 128]))
    assert np.asarray(load_image(png_of(rgba), "ds", "k")).tolist() == [[[255, 255, 255], [10, 20, 30],
                                                                         [127, 127, 127]]]
    la = Image.frombytes("LA", (2, 1), bytes([0, 0, 90, 255]))
    assert np.asarray(load_image(png_of(la), "ds", "k")).tolist() == [[[255, 255, 255], [90, 90, 90]]]
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0]))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255]]]
    one = Image.frombytes("1", (2, 1), bytes([0b01000000]))
    assert np.asarray(load_image(png_of(one), "ds", "k")).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    f = Image.fromarray(np.array([[0.0, 127.6, 300.0, np.nan, -4.0]], dtype=np.float32))
    assert f.mode == "F"
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 128, 255, 0, 0]
    for img in (pal, rgba, la, cmyk, one, f, Image.new("La", (2, 2)), Image.new("RGBa", (2, 2)),
                Image.new("YCbCr", (2, 2)), Image.new("I;16", (2, 2))):
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size and out is not img


# ------------------------------------------------------------------------------------------------ text
def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_non_utf8_caption_in_a_laion_tar_is_a_named_skip(tok, tmp_path):
    root = tmp_path / "laion"
    root.mkdir()
    _tar(root / "00000.tar", {
        "k0.jpg": _jpeg((1, 2, 3)), "k0.json": json.dumps({"caption": "A Good One"}).encode(),
        "k1.jpg": _jpeg((1, 2, 3)), "k1.json": b'{"caption": "caf\xe9 cr\xe8me"}',  # latin-1, not UTF-8
        "k2.jpg": _jpeg((1, 2, 3)), "k2.txt": b"bad \xff\xfe caption",
        "k3.jpg": _jpeg((1, 2, 3)), "k3.txt": "A Caf\u00e9 Caption\n".encode(),  # a txt-only sample is fine
    })
    tracker = BadSampleTracker("blip", max_bad_fraction=1.0)
    src = LaionSource("blip", root, "00000.tar", tok, tracker)
    good, errors = [], []
    for key, sample in src.records("00000.tar"):
        try:
            good.append((key, src.document(key, sample, np.random.default_rng(0))))
        except SampleError as err:
            errors.append(err)
    assert [k for k, _ in good] == ["00000.tar:k0", "00000.tar:k3"]
    run, text = tok.image_run, "a caf\u00e9 caption"
    assert tuple(good[1][1].ids) in {tuple(tok.encode(run + text + "</s>")), tuple(tok.encode(text + run + "</s>"))}, \
        "the txt caption is used, stripped and lower-cased"
    assert [(e.kind, e.source, e.key) for e in errors] == [("non-UTF-8 text", "blip", "00000.tar:k1.json"),
                                                          ("non-UTF-8 text", "blip", "00000.tar:k2.txt")]
    assert "b'\\xe9 cr' at byte offset 16" in str(errors[0])
    # through the stream: skipped and counted, the run goes on
    ds = build_dataset({"type": "laion", "name": "blip", "data_root": str(root), "shards": "00000.tar", "seq_len": 64,
                        "batch_size": 1, "shuffle_buffer": 1, "transform": TF, "max_bad_fraction": 1.0}, tok,
                       rank=0, world_size=1)
    assert len(list(ds.documents(0, 0, 1))) == 2
    assert ds.source.tracker.reasons == {"non-UTF-8 text": 2}


def test_non_utf8_and_bom_lines_in_an_mmc4_zip(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=1, docs_per_shard=2)
    member = "docs_no_face_shard_0_v3.jsonl"
    zpath = root / "mmc4_annts" / f"{member}.zip"
    with zipfile.ZipFile(zpath) as zf:
        lines = zf.read(member).splitlines()
    bad = lines[1].replace(b"sentence 0.", b"sentence \xc3\x28.")  # an invalid 2-byte sequence
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr(member, b"\n".join([b"\xef\xbb\xbf" + lines[0], bad, lines[0]]) + b"\n")
    ds = build_dataset(mmc4_cfg(root, shards=member, max_bad_fraction=1.0), tok, rank=0, world_size=1)
    docs = list(ds.documents(0, 0, 1))
    tracker = ds.source.tracker
    assert len(docs) == 2 and tracker.good == 2, "the BOM line is kept"
    assert tracker.bad == 1 and tracker.reasons == {"non-UTF-8 text": 1}
    assert f"{zpath}:{member} [{member}:2]: non-UTF-8 text" in tracker.last_errors[-1]


def test_annotation_files_non_utf8_and_bom(tmp_path):
    whole = tmp_path / "ann.json"
    whole.write_bytes(b'[{"caption": "ok"},\n {"caption": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"ann.json is not UTF-8: invalid byte\(s\) b'\\xe9\"}\]' at byte offset "
                                        r"37 \(line 2\)"):
        read_json(whole)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": 1}).encode())
    assert read_json(bom) == {"a": 1}

    jsonl = tmp_path / "lines.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"image_id": 1, "caption": "first"}\n'
                      b'{"image_id": 2, "caption": "se\xffcond"}\n'
                      b'{"image_id": 3, "caption": "third"}\n')
    tracker = BadSampleTracker("ln", max_bad_fraction=1.0)
    rows = read_jsonl(jsonl, tracker)
    assert [k for k, _ in rows] == ["line 1", "line 3"] and rows[0][1]["caption"] == "first"
    assert tracker.reasons == {"non-UTF-8 text": 1}
    assert f"{jsonl} [line 2]: non-UTF-8 text: line has invalid UTF-8 byte(s) b'\\xffcon' at byte offset 30" \
        == tracker.last_errors[-1]


def test_non_utf8_data_config_and_csv_name_the_file(tmp_path):
    from deem.data.config import load_data_config
    from deem.data.vqa import read_mmvp

    cfg = tmp_path / "data.yaml"
    cfg.write_bytes(b"tokenizer: {type: tiny}\n# caf\xe9\n")
    with pytest.raises(DataError, match=r"data config .*data.yaml is not UTF-8: .* at byte offset 29 \(line 2\)"):
        load_data_config(cfg)
    csv = tmp_path / "Questions.csv"
    csv.write_bytes(b"Index,Question,Options,Correct Answer\n1,Is it r\xe9d?,(a) yes (b) no,(a)\n")
    with pytest.raises(DataError, match=r"Questions.csv is not UTF-8"):
        read_mmvp(csv, tmp_path, BadSampleTracker("mmvp"), {"mmvp_question": "{question} {options}"})


# ------------------------------------------------------------------------------------------------ sources
def test_a_source_whose_only_shard_is_garbage_stops_the_run(tok, tmp_path):
    mmc4 = write_mmc4(tmp_path / "mmc4", n_shards=2, docs_per_shard=4)
    laion = tmp_path / "laion"
    laion.mkdir()
    (laion / "00000.tar").write_bytes(b"this is not a tar archive at all" * 40)
    blip = {"type": "laion", "name": "blip", "data_root": str(laion), "shards": "00000.tar", "seq_len": 32,
            "max_images": 2, "batch_size": 2, "shuffle_buffer": 2, "transform": TF}
    mix = {"type": "random_mix", "probs": [1.0, 1.0], "datasets": [
        mmc4_cfg(mmc4, shards="docs_no_face_shard_{0..1}_v3.jsonl", seq_len=32, max_images=2), blip]}
    with pytest.raises(NoValidSamples, match=r"source blip: no valid sample in a whole pass over 1 shard\(s\) .*"
                                             r"unreadable"):
        list(build_dataset(mix, tok, rank=0, world_size=1))
    with pytest.raises(NoValidSamples, match="source blip"):
        next(iter(build_dataset(blip, tok, rank=0, world_size=1)))
    # every image of a source unreadable: the same
    bad_images = write_laion(tmp_path / "laion2", n_shards=1, per_shard=3, bad_keys=("000000000", "000000001",
                                                                                   "000000002"))
    with pytest.raises(NoValidSamples, match=r"source blip2: .*corrupt image"):
        list(build_dataset({**blip, "name": "blip2", "data_root": str(bad_images), "max_bad_fraction": 1.0}, tok,
                           rank=0, world_size=1))


def test_mmc4_document_with_every_image_unreadable_is_counted(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=1, docs_per_shard=1)
    for p in (root / "mmc4_images").iterdir():
        p.write_bytes(b"garbage")
    ds = build_dataset(mmc4_cfg(root, shards="docs_no_face_shard_0_v3.jsonl", max_bad_fraction=1.0), tok, rank=0,
                       world_size=1)
    with pytest.raises(NoValidSamples, match="source mmc4"):
        list(ds.documents(0, 0, 1))
    assert ds.source.tracker.reasons == {"corrupt image": 2, "no loadable image": 1}
    assert ds.source.tracker.good == 0


def test_corrupt_deflate_data_in_an_mmc4_shard_is_a_skipped_shard(tok, tmp_path):
    root = write_mmc4(tmp_path, n_shards=2, docs_per_shard=2)
    member = "docs_no_face_shard_1_v3.jsonl"
    zpath = root / "mmc4_annts" / f"{member}.zip"
    with zipfile.ZipFile(zpath) as zf:
        text = zf.read(member)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, text)
    data = bytearray(zpath.read_bytes())
    data[30 + len(member)] = 0xFF  # first byte of the deflate stream, after the local header: invalid block type
    zpath.write_bytes(bytes(data))
    ds = build_dataset(mmc4_cfg(root, shards="docs_no_face_shard_{0..1}_v3.jsonl", max_bad_fraction=1.0), tok,
                       rank=0, world_size=1)
    assert len(list(ds.documents(0, 0, 1))) == 2, "the other shard's documents are read"
    assert ds.source.tracker.reasons == {"unreadable shard": 1}
    assert f"{zpath} [{member}]: unreadable shard: Error -3" in ds.source.tracker.last_errors[-1]
