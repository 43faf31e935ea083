"""Tokenizer loading (LLaMA layout, offline) and the tiny tokenizer's special-token roles."""

from __future__ import annotations

import json
import string

import pytest

from deem.data.errors import DataError
from deem.data.tokenizer import load_llama_tokenizer, load_tokenizer


def _write_llama_dir(path, size: int = 32000):
    """A LLaMA-layout tokenizer directory (tokenizer.json + config, saved by LlamaTokenizerFast) whose
    vocabulary has `size` pieces like Vicuna's, so the DEEM tokens must land on 32000-32005."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in ["▁", *string.printable.strip(), "\n", "▁r", "▁re", "▁red"]:
        vocab.setdefault(piece, len(vocab))
    while len(vocab) < size:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "r"), ("▁r", "e"), ("▁re", "d")], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    LlamaTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(path))


def test_llama_directory_gets_deem_ids(tmp_path):
    _write_llama_dir(tmp_path / "vicuna")
    tok = load_llama_tokenizer(tmp_path / "vicuna")
    sp = tok.special
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 31999)
    assert (sp.soi_id, sp.image_id, sp.ref_id, sp.ref_end_id, sp.box_id, sp.box_end_id) == tuple(range(32000, 32006))
    assert tok.vocab_size == 32006
    ids = tok.encode("red" + tok.image_run + "</s>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ids.count(32000) == 1 and ids.count(32001) == 77
    assert "▁red" in tok.hf.convert_ids_to_tokens(ids)


def test_llama_directory_from_config_and_errors(tmp_path):
    _write_llama_dir(tmp_path / "v", size=300)
    tok = load_tokenizer({"type": "llama", "path": str(tmp_path / "v"), "num_img_token": 5})
    assert tok.num_img_token == 5 and tok.special.soi_id == 300
    with pytest.raises(DataError, match="does not exist"):
        load_llama_tokenizer(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    with pytest.raises(DataError, match="broken"):
        load_llama_tokenizer(tmp_path / "broken")


def test_tiny_tokenizer_roles_and_roundtrip(tok, tmp_path):
    sp = tok.special
    ids = set(sp.as_dict().values())
    assert len(ids) == 9, "every role has its own id"
    assert sp.pad_id not in (sp.bos_id, sp.eos_id) and tok.hf.convert_ids_to_tokens(sp.pad_id) == "<pad>"
    text = "## USER: " + tok.image_run + "Is there a red circle? \n ## ASSISTANT: The answer is yes</s>"
    ids_ = tok.encode(text)
    assert ids_[0] == sp.bos_id and ids_[-1] == sp.eos_id
    assert tok.hf.unk_token_id not in ids_, "prompt characters, newlines included, are all in the alphabet"
    assert tok.decode(ids_[1:]) == text
    tok.hf.save_pretrained(str(tmp_path / "tiny"))
    again = load_tokenizer({"type": "hf", "path": str(tmp_path / "tiny"), "num_img_token": 3})
    assert again.special == sp and again.encode(text) == ids_


def test_encode_segments_is_joint_tokenisation(tok):
    prompt, answer = "## ASSISTANT:  The answer is", " yes</s>"
    ids, trainable = tok.encode_segments([(prompt, False), (answer, True)])
    assert ids == tok.encode(prompt + answer)
    n_prompt = trainable.index(True)
    assert ids[:n_prompt] == tok.encode(prompt), "the prompt part tokenises the same alone and jointly here"
    assert tok.decode(ids[n_prompt:]) == "yes</s>"
    assert all(trainable[n_prompt:]) and not any(trainable[:n_prompt])


def test_decode_compact_shows_image_runs(tok):
    ids = tok.encode("a" + tok.image_run + "b")
    assert tok.decode_compact(ids) == "<s> a<|startofimage|><image x3>b"


def test_unknown_tokenizer_type():
    with pytest.raises(DataError, match="unknown tokenizer type"):
        load_tokenizer({"type": "bert"})
