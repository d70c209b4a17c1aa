"""What makes a generated paraphrase or negation usable, for both generators (docs/contract.md §6).

A text is kept when it is non-empty, holds no ` || ` separator (nor a bare `||`, which the triplet
reader would split), and differs from its caption beyond case, spacing and punctuation; texts of
one caption are distinct from each other, and no negation repeats a paraphrase.
"""

from __future__ import annotations

import re

FORBIDDEN = "||"  # the §6 cell separator (without its spaces): a text containing it would be split on read
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def clean_text(text: str) -> str:
    """One line, single spaces, no surrounding blanks (a caption cell must stay a single CSV field value)."""
    return " ".join(text.split())


def word_key(text: str) -> tuple[str, ...]:
    """The words of a text, lower-cased: two texts with the same key say the same thing in the same words."""
    return tuple(word.lower() for word in _WORD.findall(text))


def text_problem(caption: str, text: object) -> str | None:
    """Why `text` cannot be a paraphrase or negation of `caption`, or None."""
    if not isinstance(text, str):
        return f"not a string: {text!r}"
    cleaned = clean_text(text)
    if not word_key(cleaned):
        return "empty"
    if FORBIDDEN in cleaned:
        return f"contains the separator {FORBIDDEN!r}"
    if word_key(cleaned) == word_key(caption):
        return "same words as the caption"
    return None


def select_texts(caption: str, candidates: list[object], count: int,
                 avoid: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """The first `count` usable, mutually distinct candidates (cleaned), and the problems of the rejected ones.

    `avoid` holds texts the selection must not repeat (the paraphrases, when selecting negations).
    """
    chosen: list[str] = []
    problems: list[str] = []
    seen = {word_key(text) for text in avoid}
    for candidate in candidates:
        if len(chosen) == count:
            break
        problem = text_problem(caption, candidate)
        if problem is None and word_key(candidate) in seen:  # type: ignore[arg-type]
            problem = "duplicate"
        if problem is not None:
            problems.append(f"{candidate!r}: {problem}")
            continue
        cleaned = clean_text(candidate)  # type: ignore[arg-type]
        chosen.append(cleaned)
        seen.add(word_key(cleaned))
    return chosen, problems
