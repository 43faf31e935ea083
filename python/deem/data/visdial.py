"""VisDial v1.0 dense evaluation reader (answer-option ranking)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deem.data.errors import BadSampleTracker
from deem.data.records import RecordDataset, parse_records, read_json


@dataclass
class DialogRecord:
    image: Path
    image_id: int
    caption: str
    history: list[tuple[str, str]]  # every (question, answer) round before the evaluated one
    question: str
    options: list[str]
    relevance: list[float]
    round_id: int


class VisDialDataset(RecordDataset):
    """Items: {images: [views], caption, history, question, options (100 strings), relevance, image_id, round_id}."""

    def __init__(self, name, records, transform, tracker, seed=0):
        super().__init__(name, records, transform, tracker, seed=seed, eval_mode=True)

    def load_item(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        rec: DialogRecord = self.records[index]
        views, _ = self.image_views(rec.image, f"image {rec.image_id}", rng)
        return {"images": [views], "caption": rec.caption, "history": list(rec.history), "question": rec.question,
                "options": list(rec.options), "relevance": list(rec.relevance), "image_id": rec.image_id,
                "round_id": rec.round_id}


def read_visdial(dialogs_file, dense_file, image_root, tracker: BadSampleTracker,
                 image_pattern: str = "VisualDialog_val2018_{image_id:012d}.jpg") -> list[DialogRecord]:
    """visdial_1.0_val.json + visdial_1.0_val_dense_annotations.json. The history holds *all* rounds before the
    dense round (the original dropped the previous round, spec §5.13)."""
    data = read_json(dialogs_file)["data"]
    questions, answers = data["questions"], data["answers"]
    dialogs = {d["image_id"]: d for d in data["dialogs"]}

    def parse(key, dense):
        dialog = dialogs[dense["image_id"]]
        rnd = int(dense["round_id"]) - 1  # round_id is 1-based
        turns = dialog["dialog"]
        if not 0 <= rnd < len(turns):
            raise ValueError(f"round_id {dense['round_id']} outside dialog of {len(turns)} rounds")
        history = [(questions[t["question"]], answers[t["answer"]]) for t in turns[:rnd]]
        options = [answers[i] for i in turns[rnd]["answer_options"]]
        relevance = [float(r) for r in dense.get("gt_relevance", dense.get("relevance"))]
        if len(relevance) != len(options):
            raise ValueError(f"{len(relevance)} relevance scores for {len(options)} options")
        return DialogRecord(Path(image_root) / image_pattern.format(image_id=int(dense["image_id"])),
                            int(dense["image_id"]), dialog["caption"], history, questions[turns[rnd]["question"]],
                            options, relevance, int(dense["round_id"]))

    dense = read_json(dense_file)
    return parse_records(((f"image {d.get('image_id')}", d) for d in dense), parse, tracker, str(dense_file))


def build_visdial_dataset(cfg: dict, transform, tracker: BadSampleTracker) -> VisDialDataset:
    records = read_visdial(cfg["dialogs"], cfg["dense_annotations"], cfg["image_root"], tracker,
                           image_pattern=cfg.get("image_pattern", "VisualDialog_val2018_{image_id:012d}.jpg"))
    return VisDialDataset(cfg.get("name", "visdial"), records, transform, tracker, seed=cfg.get("seed", 0))
