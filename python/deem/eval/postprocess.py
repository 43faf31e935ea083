"""Turning generated text into the answer a metric scores."""

from __future__ import annotations


def first_line(text: str) -> str:
    """The stripped first non-empty line of a generation (the standard VQA answer: the metric normalises it)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def first_sentence(text: str) -> str:
    """Text up to the first "." (the original's `use_1st_sentence_only` option for captions)."""
    return text.split(".")[0].strip()


def original_extract_answer(text: str) -> str:
    """The original DEEM answer heuristics (`extract_answer`, spec data-eval.md §3.2), for parity runs only:
    remove `"`, strip, keep the text before the first newline and then before the first ".", ",", "!";
    lower-case; for each of "is ", "are ", "a ", "an ", "the " (substring tests, so they also hit inside
    words) keep only the text between its first and second occurrence; cut before " of", " or ", " and "."""
    t = text.replace('"', "").strip()
    t = t.split("\n")[0]
    for sep in (".", ",", "!"):
        t = t.split(sep)[0]
    t = t.lower()
    for word in ("is ", "are ", "a ", "an ", "the "):
        if word in t:
            t = t.split(word)[1]
    for word in (" of", " or ", " and "):
        if word in t:
            t = t.split(word)[0]
    return t.strip()


def clean_referring(text: str) -> str:
    """Region-caption clean-up of the original: "#", "user:" and "asistant:" become spaces, then strip."""
    for junk in ("#", "user:", "asistant:"):
        text = text.replace(junk, " ")
    return text.strip()


ANSWER_RULES = {"first_line": first_line, "original": original_extract_answer, "raw": str.strip}
CAPTION_RULES = {"strip": str.strip, "first_sentence": first_sentence}
