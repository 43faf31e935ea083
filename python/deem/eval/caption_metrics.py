"""Captioning metrics through pycocoevalcap (the COCO caption evaluation): PTB tokenisation, BLEU-1..4, METEOR,
ROUGE-L and CIDEr(-D), every prediction scored against ALL of its references (the standard protocol; the
original DEEM scored one random reference, spec data-eval.md §5.16). SPICE is not used (it downloads models).

PTBTokenizer and METEOR run Java; the METEOR process (a JVM that loads its paraphrase table, several seconds)
is started once per Python process and reused.
"""

from __future__ import annotations

import atexit
import shutil
import threading
from collections.abc import Mapping, Sequence

from deem.errors import UserError

_METEOR = None
_METEOR_LOCK = threading.Lock()


class CaptionMetricError(UserError, RuntimeError):
    """pycocoevalcap could not run (Java missing, a scorer failed)."""


def require_java() -> None:
    """Raise `CaptionMetricError` unless `java` (which the COCO caption metrics run) is on PATH."""
    if shutil.which("java") is None:
        raise CaptionMetricError("captioning metrics need Java (pycocoevalcap's PTBTokenizer and METEOR): "
                                 "install a JRE so that `java` is on PATH")


def _meteor():
    global _METEOR
    with _METEOR_LOCK:
        if _METEOR is None:
            from pycocoevalcap.meteor.meteor import Meteor

            _METEOR = Meteor()
            atexit.register(_close_meteor)
        return _METEOR


def _close_meteor() -> None:
    global _METEOR
    m, _METEOR = _METEOR, None
    if m is not None:
        try:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
        except Exception:  # best effort at interpreter exit
            pass


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """PTB-tokenise (lower-case, punctuation removed) every caption of every key in one Java call."""
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": str(c)} for c in caps] for k, caps in captions.items()}
    out = PTBTokenizer().tokenize(data)
    missing = [k for k in captions if captions[k] and k not in out]
    if missing:
        raise CaptionMetricError(f"PTBTokenizer lost the captions of {missing[:5]}")
    return {k: out.get(k, []) for k in captions}


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   metrics: Sequence[str] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
                   tokenize: bool = True) -> dict[str, float]:
    """COCO caption metrics of `predictions` (id -> caption) against `references` (id -> list of captions).

    Returns raw pycocoevalcap values (BLEU/METEOR/ROUGE-L in [0, 1], CIDEr on its 0-10 scale) under the keys
    `BLEU_1`..`BLEU_4`, `METEOR`, `ROUGE_L`, `CIDEr`. Corpus-level: CIDEr's document frequencies come from the
    references of the scored ids."""
    if not predictions:
        raise ValueError("no predictions to score")
    ids = list(predictions)
    absent = [i for i in ids if not references.get(i)]
    if absent:
        raise ValueError(f"no references for {len(absent)} predictions, e.g. {absent[:5]}")
    if tokenize:
        # one Java call for both sides: keys are prefixed so predictions and references cannot collide
        joint = {**{f"p\x00{i}": [predictions[i]] for i in ids}, **{f"r\x00{i}": list(references[i]) for i in ids}}
        tok = ptb_tokenize(joint)
        res = {i: tok[f"p\x00{i}"] for i in ids}
        gts = {i: tok[f"r\x00{i}"] for i in ids}
    else:
        res = {i: [predictions[i]] for i in ids}
        gts = {i: list(references[i]) for i in ids}
    out: dict[str, float] = {}
    try:
        if "BLEU" in metrics:
            from pycocoevalcap.bleu.bleu import Bleu

            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            out.update({f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if "METEOR" in metrics:
            require_java()
            m = _meteor()
            # METEOR's protocol is line based: a caption must not contain a newline or the separator
            clean = {i: [c.replace("\n", " ").replace("|||", " ") for c in v] for i, v in gts.items()}
            score, _ = m.compute_score(clean, {i: [v[0].replace("\n", " ")] for i, v in res.items()})
            out["METEOR"] = float(score)
        if "ROUGE_L" in metrics:
            from pycocoevalcap.rouge.rouge import Rouge

            score, _ = Rouge().compute_score(gts, res)
            out["ROUGE_L"] = float(score)
        if "CIDEr" in metrics:
            from pycocoevalcap.cider.cider import Cider

            score, _ = Cider().compute_score(gts, res)
            out["CIDEr"] = float(score)
    except (OSError, ValueError, AssertionError) as exc:
        _close_meteor()  # a METEOR process in an unknown state is restarted by the next call
        raise CaptionMetricError(f"pycocoevalcap failed: {type(exc).__name__}: {exc}") from exc
    return out
