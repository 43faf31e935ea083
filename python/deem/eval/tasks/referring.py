"""RefCOCOg mask referring (region captioning): the cleaned answer against the references, scored as captions."""

from __future__ import annotations

from deem.eval.postprocess import clean_referring
from deem.eval.tasks import caption
from deem.eval.tasks.base import Task, sample_id


def record(item, text, ctx):
    return {"id": sample_id(item), "generation": text, "prediction": clean_referring(text),
            "references": list(item["references"])}


TASK = Task("referring", ("generate_referring",), record, caption.score, ("CIDEr", "METEOR"),
            dataset_types=("refcocog_referring_eval",))
