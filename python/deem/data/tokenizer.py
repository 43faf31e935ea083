"""Tokenizers: the LLaMA/Vicuna tokenizer from a local directory and a tiny offline one.

Collators never hard-code token ids: they read them from `SpecialTokens` (defined in :mod:`deem.tokens`),
which is looked up from the tokenizer itself. The real Vicuna tokenizer gets the DEEM ids (soi 32000, image
32001, grounding tokens 32002-32005, pad 31999, bos 1, eos 2); a tiny tokenizer has the same tokens and roles
with other ids.
"""

from __future__ import annotations

import itertools
import json
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from deem.data.errors import DataError
from deem.data.text import read_text_file
from deem.tokens import (
    GROUNDING_TOKENS,
    IMAGE_TOKEN,
    LLAMA_PAD_ID,
    SOI_TOKEN,
    SpecialTokens,
    TokenLayout,
)


class DeemTokenizer:
    """A HF tokenizer plus DEEM's special tokens and the image run (`<soi>` + `num_img_token` x `<image>`).

    `encode_segments` tokenises a text made of consecutive segments *jointly* (so the ids are exactly those
    of the whole string) and reports, per token, which segment it starts in: label masks are built from
    character offsets, never from separately tokenised pieces whose lengths can drift.
    """

    def __init__(self, hf_tokenizer, special: SpecialTokens, num_img_token: int = 77):
        if num_img_token < 1:
            raise DataError(f"num_img_token must be >= 1, got {num_img_token}")
        self.hf = hf_tokenizer
        self.special = special
        self.num_img_token = num_img_token

    @property
    def image_run(self) -> str:
        """The text of one image placeholder: `<|startofimage|>` followed by `num_img_token` `<|sniffer|>`."""
        return self.special.soi + self.special.image * self.num_img_token

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def layout(self) -> TokenLayout:
        """The special ids, vocabulary size and image run length a model built for this tokenizer must have."""
        return TokenLayout(self.special, self.vocab_size, self.num_img_token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.hf(text, add_special_tokens=False)["input_ids"]
        return [self.special.bos_id, *ids] if add_bos else list(ids)

    def encode_segments(
        self, segments: Sequence[tuple[str, bool]], add_bos: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Tokenise the concatenation of `segments` ((text, trainable) pairs) in one pass.

        Returns the ids and, per id, whether the token starts inside a trainable segment. BOS is never
        trainable. A token that straddles a boundary belongs to the segment where it starts.
        """
        text = "".join(s for s, _ in segments)
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        bounds, pos = [], 0
        for seg, trainable in segments:
            bounds.append((pos, pos + len(seg), trainable))
            pos += len(seg)
        flags = []
        for start, _end in enc["offset_mapping"]:
            flags.append(next((t for lo, hi, t in bounds if lo <= start < hi), bool(bounds and bounds[-1][2])))
        ids = list(enc["input_ids"])
        if add_bos:
            return [self.special.bos_id, *ids], [False, *flags]
        return ids, flags

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_compact(self, ids: Iterable[int]) -> str:
        """Decode with every run of `<|sniffer|>` shown as `<image xN>`: readable dumps for `deem data inspect`."""
        parts = []
        for is_image, group in itertools.groupby(ids, key=lambda i: i == self.special.image_id):
            group = list(group)
            parts.append(f"<image x{len(group)}>" if is_image else self.hf.decode(group))
        return "".join(parts)


def _token_id(hf_tokenizer, token: str) -> int:
    tid = hf_tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == hf_tokenizer.unk_token_id and token != hf_tokenizer.unk_token):
        raise DataError(f"tokenizer has no token {token!r}")
    return int(tid)


def add_deem_tokens(hf_tokenizer, grounding: bool = True) -> None:
    """Add `<|startofimage|>`, `<|sniffer|>` and (if `grounding`) `<ref>` `</ref>` `<box>` `</box>`, in that order."""
    tokens = [SOI_TOKEN, IMAGE_TOKEN, *(GROUNDING_TOKENS if grounding else ())]
    missing = [t for t in tokens if t not in hf_tokenizer.get_vocab()]
    if missing:
        hf_tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def special_tokens_of(hf_tokenizer, pad_id: int | None = None) -> SpecialTokens:
    """Look up the DEEM special tokens in a tokenizer that already has them (see `add_deem_tokens`)."""
    pad = pad_id if pad_id is not None else hf_tokenizer.pad_token_id
    if pad is None:
        raise DataError("tokenizer has no pad token and no pad_id was given")
    return SpecialTokens(
        bos_id=_token_id(hf_tokenizer, hf_tokenizer.bos_token or "<s>"),
        eos_id=_token_id(hf_tokenizer, hf_tokenizer.eos_token or "</s>"),
        pad_id=int(pad),
        soi_id=_token_id(hf_tokenizer, SOI_TOKEN),
        image_id=_token_id(hf_tokenizer, IMAGE_TOKEN),
        ref_id=_token_id(hf_tokenizer, "<ref>"),
        ref_end_id=_token_id(hf_tokenizer, "</ref>"),
        box_id=_token_id(hf_tokenizer, "<box>"),
        box_end_id=_token_id(hf_tokenizer, "</box>"),
        bos=hf_tokenizer.bos_token or "<s>",
        eos=hf_tokenizer.eos_token or "</s>",
    )


def load_llama_tokenizer(path: str | Path, pad_id: int | None = LLAMA_PAD_ID, num_img_token: int = 77) -> DeemTokenizer:
    """Load the LLaMA/Vicuna tokenizer from a local directory (offline, no remote code) and add DEEM's tokens.

    With the Vicuna-7B vocabulary (32000 pieces) the added tokens get ids 32000-32005 and pad is 31999, as in
    the original; a directory whose tokenizer defines its own pad token can pass `pad_id=None` to use it.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer directory {path} does not exist")
    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types; name the directory
        raise DataError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if len(hf) < 100:  # transformers builds an (almost) empty tokenizer when the vocabulary file is missing
        raise DataError(f"tokenizer in {path} has only {len(hf)} tokens: tokenizer.model / tokenizer.json missing?")
    add_deem_tokens(hf, grounding=True)
    special = special_tokens_of(hf, pad_id=pad_id)
    if len(hf) == 32006 and (special.soi_id, special.image_id, special.box_end_id) != (32000, 32001, 32005):
        raise DataError(f"{path}: DEEM tokens got unexpected ids {special.as_dict()}")
    return DeemTokenizer(hf, special, num_img_token=num_img_token)


def build_tiny_tokenizer(
    corpus: Iterable[str], vocab_size: int = 512, num_img_token: int = 4, save_dir: str | Path | None = None
) -> DeemTokenizer:
    """Train a small BPE tokenizer on `corpus` in memory (HF `tokenizers`), with DEEM's special tokens.

    Ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3 (a dedicated pad token), then the learned vocabulary, then
    `<|startofimage|>`, `<|sniffer|>`, `<ref>`, `</ref>`, `<box>`, `</box>`. Every printable ASCII character
    is in the alphabet, so any English prompt tokenises without `<unk>`. With `save_dir` the tokenizer is
    written in the HF layout (tokenizer.json + config) and can be reloaded with `load_tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=base, initial_alphabet=[*string.printable.strip(), "\n", "▁"],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    add_deem_tokens(hf, grounding=True)
    if save_dir is not None:
        hf.save_pretrained(str(save_dir))
    return DeemTokenizer(hf, special_tokens_of(hf), num_img_token=num_img_token)


def build_llama_layout_tokenizer(
    corpus: Iterable[str], save_dir: str | Path, learned: int = 512, size: int = 32000
) -> DeemTokenizer:
    """A stand-in for the Vicuna tokenizer with its id layout: `<unk>` 0, `<s>` 1, `</s>` 2, a small BPE
    vocabulary learned on `corpus`, unused filler pieces up to `size` (32000), so that `load_llama_tokenizer`
    gives DEEM's tokens the ids 32000-32005 and pad 31999, exactly as with the real tokenizer. It lets the 7B
    architecture train on the synthetic world. Written to `save_dir` in the HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=learned, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[*string.printable.strip(), "\n", "▁"], show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    if len(vocab) > size:
        raise DataError(f"the learned vocabulary ({len(vocab)}) exceeds the layout's {size} pieces")
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), size)})
    tok = Tokenizer.from_str(json.dumps(state))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(str(save_dir))
    return load_llama_tokenizer(save_dir)


def load_tokenizer(cfg: dict | str | Path) -> DeemTokenizer:
    """Build a tokenizer from a config: `{type: llama, path, pad_id?, num_img_token?}`,
    `{type: tiny, corpus: [..] | corpus_file, vocab_size?, num_img_token?}` or `{type: hf, path, ...}`
    (any local HF tokenizer directory that already has, or gets, the DEEM tokens; its own pad token is used).
    A plain string/path means a llama directory."""
    if isinstance(cfg, (str, Path)):
        cfg = {"type": "llama", "path": str(cfg)}
    kind = cfg.get("type", "llama")
    num_img_token = int(cfg.get("num_img_token", 77 if kind == "llama" else 4))
    if kind == "llama":
        return load_llama_tokenizer(cfg["path"], pad_id=cfg.get("pad_id", LLAMA_PAD_ID), num_img_token=num_img_token)
    if kind == "hf":
        return load_llama_tokenizer(cfg["path"], pad_id=cfg.get("pad_id"), num_img_token=num_img_token)
    if kind == "tiny":
        corpus = cfg.get("corpus")
        if corpus is None and "corpus_file" in cfg:
            corpus = read_text_file(cfg["corpus_file"], "tokenizer corpus file").splitlines()
        if corpus is None:
            from deem.data.synth import synth_corpus

            corpus = synth_corpus()
        return build_tiny_tokenizer(corpus, vocab_size=int(cfg.get("vocab_size", 512)), num_img_token=num_img_token)
    raise DataError(f"unknown tokenizer type {kind!r} (expected llama, hf or tiny)")
