"""Collators: dataset items -> exactly the model's inputs (spec model.md §1), with the spec's label rules.

Training batches (right-padded): text_ids, attention_mask, gt_text_ids (unshifted labels, -100 = no loss),
image_tensors, image_tensors_dec, image_tensors_mask, num_image_per_seq, nearest_bos_idxs,
ignore_prompt_token_offset, loss_img_weight, loss_txt_weight, meta.
Evaluation batches (left-padded prompts): the same image/text inputs plus collate_mode, generation_kwargs
and per-item meta (ids, references, answers). Items that failed to load (None) are dropped; a batch with
no usable item collates to None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deem.data.errors import BadSampleTracker, DataError, SampleError
from deem.data.labels import build_labels, nearest_bos_indices, pad_sequences
from deem.data.prompts import CAPTION_QUESTIONS, IMAGE_QUESTIONS, assemble, merged_prompts
from deem.data.records import ImageViews
from deem.data.referring import MASK
from deem.data.tokenizer import DeemTokenizer


@dataclass
class Example:
    """One sequence before padding: text segments ((text, trainable) pairs) and its image slots in order."""

    segments: list[tuple[str, bool]]
    images: list[ImageViews]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Encoded:
    ids: list[int]
    trainable: list[bool]
    images: list[ImageViews]
    meta: dict[str, Any]


# the keys of a collated batch that are `DeemModel.forward` arguments; every other key is metadata
MODEL_INPUTS = ("text_ids", "attention_mask", "gt_text_ids", "image_tensors", "image_tensors_dec",
                "image_tensors_mask", "num_image_per_seq", "nearest_bos_idxs", "loss_txt_weight", "loss_img_weight")


def split_batch(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A collated batch (of a collator or a stream) as (model inputs, metadata): the inputs go to the model as
    they are, the metadata (`meta`, prompt offsets, ...) stays with the data pipeline and the logs."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return inputs, {k: v for k, v in batch.items() if k not in MODEL_INPUTS}


def _item_meta(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("images", "seed")}


class BaseCollator:
    """Shared machinery: joint tokenisation with trainable spans, image-run validation, padding, stacking."""

    collate_mode: str | None = None
    default_generation_kwargs: dict[str, Any] = {}  # noqa: RUF012  (read-only class default)

    def __init__(self, tokenizer: DeemTokenizer, prompts: dict[str, str] | None = None, max_length: int = 2048,
                 seed: int = 0, tracker: BadSampleTracker | None = None, generation_kwargs: dict | None = None,
                 max_bad_fraction: float = 0.05):
        self.tok = tokenizer
        self.prompts = merged_prompts(prompts)
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.tracker = tracker or BadSampleTracker(type(self).__name__, max_bad_fraction=max_bad_fraction)
        # a configured dict replaces the default entirely (as in the original)
        self.generation_kwargs = dict(self.default_generation_kwargs if generation_kwargs is None
                                      else generation_kwargs)

    @property
    def img(self) -> str:
        return self.tok.image_run

    def batch_rng(self, items: Sequence[dict[str, Any]]) -> np.random.Generator:
        """A generator determined by the batch's items (same in every worker/rank, changes with epoch)."""
        first = items[0].get("seed", (0, 0, 0))
        return np.random.default_rng([self.seed, *first, *(int(it.get("index", 0)) for it in items)])

    def encode(self, ex: Example) -> Encoded:
        ids, trainable = self.tok.encode_segments(ex.segments)
        key = f"{ex.meta.get('dataset', '?')}[{ex.meta.get('index', '?')}]"
        if len(ids) > self.max_length:
            raise SampleError(str(ex.meta.get("dataset", "?")), key,
                              f"over-long sample: {len(ids)} tokens > max_length {self.max_length}")
        self.check_image_runs(ids, len(ex.images), key)
        return Encoded(ids, trainable, ex.images, ex.meta)

    def check_image_runs(self, ids: Sequence[int], n_images: int, key: str) -> None:
        sp, n = self.tok.special, self.tok.num_img_token
        socs = [t for t, i in enumerate(ids) if i == sp.soi_id]
        n_image_tokens = sum(1 for i in ids if i == sp.image_id)
        ok = len(socs) == n_images and n_image_tokens == n * n_images and all(
            list(ids[p + 1: p + 1 + n]) == [sp.image_id] * n for p in socs)
        if not ok:
            raise SampleError("collator", key, f"text has {len(socs)} image runs / {n_image_tokens} image tokens "
                                               f"for {n_images} images (a placeholder in the raw text?)")

    def encode_all(self, examples: Sequence[Any], encode: Callable[[Any], Encoded] | None = None) -> list[Encoded]:
        """Encode each example (with `encode`, default `self.encode`); skipped ones are logged and counted."""
        encode = encode or self.encode
        out = []
        for ex in examples:
            try:
                out.append(encode(ex))
            except SampleError as err:
                self.tracker.record_bad(err)
                continue
            self.tracker.record_good()
        return out

    def stack_images(self, encoded: Sequence[Encoded]) -> dict[str, Any]:
        views = [v for e in encoded for v in e.images]
        if not views:
            raise DataError("batch has no image")
        masks = [v.mask for v in views]
        any_mask = any(m is not None for m in masks)
        return {
            "image_tensors": torch.stack([v.enc for v in views]),
            "image_tensors_dec": torch.stack([v.dec for v in views]),
            "image_tensors_mask": torch.stack([m if m is not None else torch.ones(1, *views[0].enc.shape[1:])
                                               for m in masks]) if any_mask else None,
            "num_image_per_seq": torch.tensor([len(e.images) for e in encoded], dtype=torch.long),
        }

    def train_batch(self, encoded: Sequence[Encoded], dataset_name: str, loss_img_weight: float | None = None,
                    loss_txt_weight: float | None = None) -> dict[str, Any]:
        if not encoded:
            raise DataError(f"{dataset_name}: every sample of the batch was skipped (see the logged errors)")
        sp = self.tok.special
        text_ids = pad_sequences([e.ids for e in encoded], sp.pad_id, "right")
        attention_mask = pad_sequences([[1] * len(e.ids) for e in encoded], 0, "right")
        trainable = pad_sequences([[int(t) for t in e.trainable] for e in encoded], 0, "right").bool()
        return {
            "text_ids": text_ids,
            "attention_mask": attention_mask,
            "gt_text_ids": build_labels(text_ids, attention_mask, trainable, sp),
            **self.stack_images(encoded),
            "nearest_bos_idxs": torch.tensor([i for e in encoded for i in nearest_bos_indices(e.ids, sp)],
                                             dtype=torch.long),
            "ignore_prompt_token_offset": [e.trainable.index(True) if True in e.trainable else len(e.ids)
                                           for e in encoded],
            "loss_img_weight": loss_img_weight,
            "loss_txt_weight": loss_txt_weight,
            "meta": {"dataset_name": dataset_name, "items": [e.meta for e in encoded]},
        }


class CaptionTrainCollator(BaseCollator):
    """Image-text pair SFT (spec §1.2): each batch is image->text (p=`img_first_prob`, image loss off) or
    text->image (text loss off)."""

    def __init__(self, tokenizer, img_first_prob: float = 0.5, uncond_prob: float = 0.0, **kw):
        super().__init__(tokenizer, **kw)
        self.img_first_prob, self.uncond_prob = img_first_prob, uncond_prob

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rng, p = self.batch_rng(items), self.prompts
        image_first = rng.random() < self.img_first_prob
        examples = []
        for it in items:
            if image_first:
                q = CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))]
                prompt = assemble(p["system"], p["caption_user"].format(image=self.img, question=q),
                                  p["caption_assistant"])
                completion = p["caption_completion"].format(caption=it["caption"])
            else:
                caption = "" if rng.random() < self.uncond_prob else it["caption"]
                q = IMAGE_QUESTIONS[int(rng.integers(len(IMAGE_QUESTIONS)))]
                prompt = assemble(p["system"], p["t2i_user"].format(question=q, caption=caption), p["t2i_assistant"])
                completion = p["t2i_completion"].format(image=self.img)
            examples.append(Example([(prompt, False), (completion, True)], it["images"], _item_meta(it)))
        name = items[0]["dataset"]
        if image_first:
            return self.train_batch(self.encode_all(examples), name, loss_img_weight=0.0)
        return self.train_batch(self.encode_all(examples), name, loss_txt_weight=0.0)


class VQATrainCollator(BaseCollator):
    """VQA / instruction SFT (spec §1.3); loss on the answer only, image loss off."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        p = self.prompts
        examples = [Example([
            (assemble(p["system"], p["vqa_user"].format(image=self.img, question=it["question"]), p["vqa_assistant"]),
             False),
            (p["vqa_completion"].format(answer=it["answer"]), True)], it["images"], _item_meta(it)) for it in items]
        return self.train_batch(self.encode_all(examples), items[0]["dataset"], loss_img_weight=0.0)


class GroundingTrainCollator(BaseCollator):
    """Region SFT (spec §1.4): task "referring" (box -> sentence, two image slots) and/or "grounding"
    (sentence -> `<box>(x1,y1)(x2,y2)</box>`, one image slot), drawn per sample. With `pack=True` consecutive
    samples are packed into rows of at most `max_length` tokens (each keeps its own BOS)."""

    def __init__(self, tokenizer, tasks: Sequence[str] = ("referring",), pack: bool = False, **kw):
        super().__init__(tokenizer, **kw)
        bad = sorted(set(tasks) - {"referring", "grounding"})
        if bad or not tasks:
            raise DataError(f"grounding tasks must be 'referring' and/or 'grounding', got {list(tasks)}")
        self.tasks, self.pack = list(tasks), pack

    def example(self, it: dict[str, Any], task: str) -> Example:
        p = self.prompts
        if task == "referring":
            prompt = assemble(p["system"], p["region_user"].format(image=self.img, region=self.img),
                              p["region_assistant"])
            return Example([(prompt, False), (p["region_completion"].format(sentence=it["sentence"]), True)],
                           it["images"], _item_meta(it))
        prompt = assemble(p["system"], p["box_user"].format(image=self.img, sentence=it["sentence"]),
                          p["box_assistant"])
        return Example([(prompt, False), (p["box_completion"].format(box=it["box_text"]), True)], it["images"][:1],
                       _item_meta(it))

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        rng = self.batch_rng(items)
        examples = [self.example(it, self.tasks[int(rng.integers(len(self.tasks)))]) for it in items]
        encoded = self.encode_all(examples)
        if self.pack:
            encoded = self.pack_rows(encoded)
        return self.train_batch(encoded, items[0]["dataset"])

    def pack_rows(self, encoded: list[Encoded]) -> list[Encoded]:
        rows: list[Encoded] = []
        for e in encoded:
            if rows and len(rows[-1].ids) + len(e.ids) <= self.max_length:
                last = rows[-1]
                rows[-1] = Encoded(last.ids + e.ids, last.trainable + e.trainable, last.images + e.images,
                                   {"packed": [*last.meta.get("packed", [last.meta]), e.meta]})
            else:
                rows.append(e)
        return rows


class ReferringTrainCollator(BaseCollator):
    """Mask-referring conversations (spec §1.5): SYS then `## <role>: <text>\\n` per turn and a final `</s>`;
    human turns are masked, assistant turns (tag, text, newline) and the final EOS are trained. A conversation
    longer than `max_length` loses its last rounds (and their region images); labels come from one joint
    tokenisation (spec §5.12)."""

    def segments(self, conv: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        p = self.prompts
        segs = [(p["system"], False)]
        for role, text in conv:
            if role == "human":
                segs.append((f"## {p['conv_user_role']}: " + text.replace(MASK, self.img) + "\n", False))
            else:
                segs.append((f"## {p['conv_assistant_role']}: " + text + "\n", True))
        segs.append((self.tok.special.eos, True))
        return segs

    def encode_conversation(self, it: dict[str, Any]) -> Encoded:
        conv = list(it["conversation"])
        meta = _item_meta(it)
        key = f"{it.get('dataset')}[{it.get('index')}]"
        while conv:
            segs = self.segments(conv)
            n_img = sum(s.count(self.tok.special.soi) for s, _ in segs)
            ids, trainable = self.tok.encode_segments(segs)
            if len(ids) <= self.max_length:
                self.check_image_runs(ids, n_img, key)
                meta["rounds"] = len(conv) // 2
                return Encoded(ids, trainable, it["images"][:n_img], meta)
            conv = conv[:-2]
        raise SampleError(str(it.get("dataset")), key, f"over-long sample: the first round exceeds {self.max_length}")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.train_batch(self.encode_all(items, self.encode_conversation), items[0]["dataset"])


# ---------------------------------------------------------------------------------------------- evaluation


class EvalCollator(BaseCollator):
    """A generation prompt per item (`prompt`), left-padded, with the mode and generation settings."""

    def prompt(self, item: dict[str, Any]) -> str:
        raise NotImplementedError

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
        return self.eval_batch(items, self.prompt)

    def eval_batch(self, items: Sequence[dict[str, Any] | None], prompt_of) -> dict[str, Any] | None:
        items = [it for it in items if it is not None]
        examples = [Example([(prompt_of(it), False)], it["images"], _item_meta(it)) for it in items]
        encoded = self.encode_all(examples)
        if not encoded:
            return None
        sp = self.tok.special
        return {
            "text_ids": pad_sequences([e.ids for e in encoded], sp.pad_id, "left"),
            "attention_mask": pad_sequences([[1] * len(e.ids) for e in encoded], 0, "left"),
            **self.stack_images(encoded),
            "collate_mode": self.collate_mode,
            "generation_kwargs": dict(self.generation_kwargs),
            "meta": {"dataset_name": encoded[0].meta.get("dataset"), "items": [e.meta for e in encoded]},
        }


class CaptionEvalCollator(EvalCollator):
    """Captioning (`generate_texts`): template "caption" (COCO/NoCaps/Flickr) or "paragraph" (image2paragraph)."""

    collate_mode = "generate_texts"

    def __init__(self, tokenizer, template: str = "caption", **kw):
        if template not in ("caption", "paragraph"):
            raise DataError(f"caption eval template must be 'caption' or 'paragraph', got {template!r}")
        self.default_generation_kwargs = (
            {"max_length": 20, "min_length": 8, "length_penalty": 1.0, "num_beams": 5} if template == "caption"
            else {"max_length": 90, "min_length": 90, "repetition_penalty": 1.2, "num_beams": 5})
        super().__init__(tokenizer, **kw)
        self.template = template

    def prompt(self, it: dict[str, Any]) -> str:
        p = self.prompts
        return assemble(p["system_caption_eval"], p[f"{self.template}_eval_user"].format(image=self.img),
                        p[f"{self.template}_eval_assistant"])


class VQAEvalCollator(EvalCollator):
    """Open-ended VQA (`generate_vqa`): template "vqa" or "vizwiz"."""

    collate_mode = "generate_vqa"
    default_generation_kwargs = {"max_length": 10, "min_length": 0, "length_penalty": 0.0, "num_beams": 3}  # noqa: RUF012

    def __init__(self, tokenizer, template: str = "vqa", **kw):
        if template not in ("vqa", "vizwiz"):
            raise DataError(f"VQA eval template must be 'vqa' or 'vizwiz', got {template!r}")
        super().__init__(tokenizer, **kw)
        self.template = template

    def prompt(self, it):
        p = self.prompts
        return assemble(p["system"], p[f"{self.template}_eval_user"].format(image=self.img, question=it["question"]),
                        p["vqa_eval_assistant"])


class YesNoEvalCollator(EvalCollator):
    """Yes/no and option questions: POPE, RobustVQA, MMVP (`generate_yesno`; the original calls this mode
    `generate_imagenet`)."""

    collate_mode = "generate_yesno"
    default_generation_kwargs = {"max_length": 10, "min_length": 0, "length_penalty": 0.0, "num_beams": 3}  # noqa: RUF012

    def prompt(self, it):
        p = self.prompts
        return assemble(p["system"], p["yesno_eval_user"].format(image=self.img, question=it["question"]),
                        p["yesno_eval_assistant"])


class GroundingEvalCollator(EvalCollator):
    """RefCOCO box grounding (`generate_grounding`); generation uses the model defaults."""

    collate_mode = "generate_grounding"

    def prompt(self, it):
        p = self.prompts
        return assemble(p["system"], p["grounding_eval_user"].format(image=self.img, sentence=it["sentence"]),
                        p["grounding_eval_assistant"])


class ReferringEvalCollator(EvalCollator):
    """RefCOCOg mask referring (`generate_referring`): the training conversation format up to the assistant
    tag; left-padded and without a trailing EOS (spec §5.22)."""

    collate_mode = "generate_referring"

    def prompt(self, it):
        p = self.prompts
        return (p["system"] + f"## {p['conv_user_role']}: " + self.img + p["referring_eval_preamble"] + self.img
                + "\n" + f"## {p['conv_assistant_role']}:")


class ScoreEvalCollator(EvalCollator):
    """VisDial answer ranking (`generate_scores`): context prompt (left-padded) plus every option's ids
    without BOS (`options_ids` [B, K, Lo] right-padded, `options_attention_mask`)."""

    collate_mode = "generate_scores"

    def prompt(self, it):
        p = self.prompts
        text = p["visdial_context"].format(image=self.img, caption=it["caption"])
        text += "".join(p["visdial_round"].format(question=q, answer=a) for q, a in it["history"])
        return text + p["visdial_final"].format(question=it["question"])

    def __call__(self, items):
        batch = super().__call__(items)
        if batch is None:
            return None
        kept = batch["meta"]["items"]
        opts = [[self.tok.encode(o, add_bos=False) for o in it["options"]] for it in kept]
        width = max(len(o) for row in opts for o in row)
        batch["options_ids"] = torch.stack([pad_sequences(row, self.tok.special.pad_id, "right", width)
                                            for row in opts])
        batch["options_attention_mask"] = torch.stack([pad_sequences([[1] * len(o) for o in row], 0, "right", width)
                                                       for row in opts])
        return batch
