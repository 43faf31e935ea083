"""The tokens with a role in DEEM's sequences, in the lowest layer that needs them (data and models both do).

`SpecialTokens` holds their ids and strings; `DeemConfig.special_tokens` stores the same ids as a JSON dict
(`SpecialTokens.as_dict` / `SpecialTokens.from_dict` convert). `TokenLayout` is what a tokenizer fixes in a
model: those ids, the vocabulary size and the image run length. `IGNORE_INDEX` marks a label without loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

IGNORE_INDEX = -100  # a label position that the text loss skips (torch's cross_entropy default)

SOI_TOKEN = "<|startofimage|>"
IMAGE_TOKEN = "<|sniffer|>"  # the original's string for an image-embedding slot; kept so vocabularies match
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>")
LLAMA_PAD_ID = 31999  # the original reuses an ordinary vocabulary token as pad (see docs/data.md)

# SpecialTokens field -> the key of DeemConfig.special_tokens
_DICT_KEYS = {"bos_id": "bos", "eos_id": "eos", "pad_id": "pad", "soi_id": "soi", "image_id": "image",
              "ref_id": "ref", "ref_end_id": "/ref", "box_id": "box", "box_end_id": "/box"}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids and strings of every token with a role in DEEM's sequences."""

    bos_id: int
    eos_id: int
    pad_id: int
    soi_id: int
    image_id: int
    ref_id: int
    ref_end_id: int
    box_id: int
    box_end_id: int
    bos: str = "<s>"
    eos: str = "</s>"
    soi: str = SOI_TOKEN
    image: str = IMAGE_TOKEN

    def as_dict(self) -> dict[str, int]:
        """The ids under the keys of `DeemConfig.special_tokens` ('bos', 'soi', '/ref', ...)."""
        return {key: getattr(self, name) for name, key in _DICT_KEYS.items()}

    @classmethod
    def from_dict(cls, ids: Mapping[str, int]) -> SpecialTokens:
        """The inverse of `as_dict` (default strings)."""
        missing = [key for key in _DICT_KEYS.values() if key not in ids]
        if missing:
            raise ValueError(f"special token ids lack {missing}: got {dict(ids)}")
        return cls(**{name: int(ids[key]) for name, key in _DICT_KEYS.items()})


# Vicuna-7B's vocabulary (32000 pieces) with DEEM's six tokens appended, as in the original
LLAMA_SPECIAL_TOKENS = SpecialTokens(bos_id=1, eos_id=2, pad_id=LLAMA_PAD_ID, soi_id=32000, image_id=32001,
                                     ref_id=32002, ref_end_id=32003, box_id=32004, box_end_id=32005)


@dataclass(frozen=True)
class TokenLayout:
    """What a tokenizer fixes in a model: the special ids, the vocabulary size and the image-token run length."""

    special: SpecialTokens
    vocab_size: int
    num_img_token: int
