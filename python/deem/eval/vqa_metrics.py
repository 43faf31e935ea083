"""VQA accuracy (VQAv2 / OK-VQA / TextVQA), VizWiz and GQA scoring.

Two variants of the VQA accuracy, chosen per evaluation with `vqa_metric` (docs/eval.md):

* ``official`` (the default): the official VQA evaluation (GT-Vision-Lab/VQA,
  `PythonEvaluationTools/vqaEvaluation/vqaEval.py`), implemented from its rules: the prediction always gets
  newlines/tabs -> spaces, strip, the punctuation rule, then the digit/article/contraction rule; the ground-truth
  answers get the punctuation rule only, and only when the n answers are not all identical (no strip, no
  lower-casing, no digit/article rule: the annotation files hold answers already in that form);
* ``original``: the variant the original DEEM code scores with (`uni_interleaved/utils/vqav2_metrics_src`, a
  widely copied modification): prediction and ground truths get newlines/tabs -> spaces and strip; then, only
  when the ground truths are not all identical, both sides get the punctuation and digit/article rules, and
  otherwise neither side gets anything else (so "Yes" against ten "yes" scores 0).

The rules, shared by both:

* punctuation rule: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it is followed or
  preceded by a space in the text (or the text has a digit,digit group), otherwise replaced by a space; then every
  "." not followed by a digit is deleted (the official regex `(?!<=\\d)(\\.)(?!\\d)`, whose look-behind is
  mis-written as a look-ahead, so "." after a digit is deleted too; at most 32 of them, see below);
* digit/article rule: lower-case, split on whitespace, number words zero..ten (and "none") -> digits, drop
  a/an/the, expand the contraction table, join with single spaces;
* accuracy of one question: the mean, over the n leave-one-out subsets of the n (= 10) human answers (10 choose
  9), of min(1, #matches among the other n-1 / 3).

VizWiz follows the VizWiz evaluation API (vizwiz.org, the code the original also uses): the prediction always gets
both rules, the ground truths none; the same leave-one-out formula. Every function returns fractions in [0, 1];
the engine reports percentages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# The official contraction table (vqaEval.py), verbatim data. Keys with capitals never match after the
# lower-casing of the digit/article rule; they are kept so the table is the official one.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern, mis-written look-behind included
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The official punctuation rule (see the module docstring)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        delete = p + " " in text or " " + p in text or digit_comma
        out = out.replace(p, "" if delete else " ")
    # the official call passes re.UNICODE (= 32) as the positional `count`: at most 32 periods are removed
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """The official digit/article/contraction rule: lower-case, number words -> digits, drop articles."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


VQA_METRICS = ("official", "original")


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """The official normalisation of a predicted answer (whitespace, punctuation, digit/article rules)."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _official(prediction: str, gts: list[str]) -> tuple[str, list[str]]:
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    return normalize_vqa_answer(prediction), gts


def _original(prediction: str, gts: list[str]) -> tuple[str, list[str]]:
    pred, gts = _clean_whitespace(prediction), [_clean_whitespace(a) for a in gts]
    if len(set(gts)) > 1:
        return process_digit_article(process_punctuation(pred)), [process_digit_article(process_punctuation(a))
                                                                  for a in gts]
    return pred, gts


def _vizwiz(prediction: str, gts: list[str]) -> tuple[str, list[str]]:
    return normalize_vqa_answer(prediction), gts


_VARIANTS = {"official": _official, "original": _original}


def _leave_one_out(pred: str, gts: Sequence[str]) -> float:
    total = 0.0
    for k in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != k and a == pred)
        total += min(1.0, matches / 3.0)
    return total / len(gts)


def _human_answers(gt_answers: Sequence[str]) -> list[str]:
    gts = [str(a) for a in gt_answers]
    if len(gts) < 2:
        raise ValueError(f"VQA accuracy needs several human answers (got {len(gts)}); use exact match instead")
    return gts


def check_vqa_metric(metric: str) -> str:
    """`metric` if it names a VQA accuracy variant, else a ValueError listing them."""
    if metric not in _VARIANTS:
        raise ValueError(f"unknown vqa_metric {metric!r}; choose one of {list(VQA_METRICS)}")
    return metric


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], metric: str = "official") -> float:
    """VQA accuracy of one prediction against the human answers (normally 10): the mean over the leave-one-out
    subsets of min(1, #matches / 3), after the normalisation of `metric` ("official" or "original")."""
    pred, gts = _VARIANTS[check_vqa_metric(metric)](prediction, _human_answers(gt_answers))
    return _leave_one_out(pred, gts)


def vizwiz_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """VizWiz accuracy of one prediction (the VizWiz API: only the prediction is normalised)."""
    pred, gts = _vizwiz(prediction, _human_answers(gt_answers))
    return _leave_one_out(pred, gts)


def _mean_by_type(accs: Mapping[str, float], answer_types: Mapping[str, str] | None) -> dict[str, float]:
    out = {"accuracy": sum(accs.values()) / len(accs)}
    if answer_types:
        by_type: dict[str, list[float]] = {}
        for qid, acc in accs.items():
            by_type.setdefault(str(answer_types.get(qid) or "unknown"), []).append(acc)
        for t, values in sorted(by_type.items()):
            out[f"accuracy_{t.replace('/', '_').replace(' ', '_')}"] = sum(values) / len(values)
    return out


def vqa_scores(predictions: Mapping[str, str], gt_answers: Mapping[str, Sequence[str]],
               answer_types: Mapping[str, str] | None = None, metric: str = "official") -> dict[str, float]:
    """Mean VQA accuracy (`metric`: "official" or "original") over the predicted questions (`accuracy`), and per
    answer type (`accuracy_<type>`) when `answer_types` is given."""
    if not predictions:
        raise ValueError("no predictions to score")
    check_vqa_metric(metric)
    return _mean_by_type({q: vqa_accuracy(p, gt_answers[q], metric) for q, p in predictions.items()}, answer_types)


def vizwiz_scores(predictions: Mapping[str, str], gt_answers: Mapping[str, Sequence[str]],
                  answer_types: Mapping[str, str] | None = None) -> dict[str, float]:
    """VizWiz-VQA accuracy (the VizWiz evaluation API, which the original uses too: the VQA formula over the 10
    answers, the prediction normalised, the answers as they are; "unanswerable" is an ordinary answer string and
    an answer type): overall and per answer type (yes/no, number, other, unanswerable)."""
    if not predictions:
        raise ValueError("no predictions to score")
    return _mean_by_type({q: vizwiz_accuracy(p, gt_answers[q]) for q, p in predictions.items()}, answer_types)


def normalize_gqa_answer(text: str) -> str:
    """GQA answers are short lower-case phrases: lower-case, collapse whitespace, drop final punctuation."""
    return " ".join(text.lower().split()).strip(" .,!?;:")


def gqa_scores(predictions: Mapping[str, str], answers: Mapping[str, str]) -> dict[str, float]:
    """GQA exact-match accuracy (the official `accuracy` field): prediction == the single gold answer, both
    normalised by `normalize_gqa_answer`."""
    if not predictions:
        raise ValueError("no predictions to score")
    hits = [normalize_gqa_answer(p) == normalize_gqa_answer(answers[q]) for q, p in predictions.items()]
    return {"accuracy": sum(hits) / len(hits)}
