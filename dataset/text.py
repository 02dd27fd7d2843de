"""Caption and question normalisation applied by every dataset before tokenisation."""

from __future__ import annotations

import re

# The 13 characters the original SIMLA code deletes; hyphen and slash are turned into spaces instead.
_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _truncate_words(text: str, max_words: int) -> str:
    # split on a single space: a question's inner double spaces count as empty "words"
    words = text.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words])
    return text


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Normalise a caption: lower-case, drop punctuation, collapse whitespace, keep ``max_words`` words."""
    text = _PUNCTUATION.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return _truncate_words(text, max_words)


def pre_question(question: str, max_ques_words: int = 30) -> str:
    """Normalise a VQA question like :func:`pre_caption`, keeping leading and inner spaces (as the original)."""
    text = _PUNCTUATION.sub("", question.lower())
    text = text.replace("-", " ").replace("/", " ")
    text = text.rstrip(" ")
    return _truncate_words(text, max_ques_words)
