"""The text filters of `delia sample`: answers that are empty, cut at the token limit, degenerate loops,
copies of (or talk about) the one-shot reference, or duplicates of an answer already kept.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from delia.text import normalise

REASONS = ("empty", "truncated", "repetition", "copies_reference", "mentions_reference", "duplicate")
_MENTIONS = re.compile(
    r"\b(?:the|my|your|this|that|a)\s+(?:reference|previous|above|earlier|prior|last|original)\s+(?:answer|response)"
    r"|\breference\s+(?:answer|response)"
    r"|\bas\s+(?:i\s+)?(?:mentioned|said|stated|answered|explained)\s+(?:before|above|earlier|previously)"
    r"|\b(?:repeat|restate)\s+(?:my|the)\s+(?:previous\s+)?answer",
    re.IGNORECASE,
)


def is_repetitive(text: str) -> bool:
    """Degenerate loops: few distinct word 4-grams overall or in the last third, or text that compresses
    far better than prose does (catches loops without spaces). Ordinary answers pass all three.
    """
    words = text.split()
    for span in (words, words[-max(len(words) // 3, 1):]):
        if len(span) >= 24:
            grams = {tuple(span[i:i + 4]) for i in range(len(span) - 3)}
            if len(grams) / (len(span) - 3) < (0.5 if span is words else 0.3):
                return True
    data = text.encode()
    return len(data) >= 120 and len(zlib.compress(data)) / len(data) < 0.15


def mentions_reference(text: str) -> bool:
    """The answer talks about the one-shot example ("as in the reference answer") instead of answering."""
    return _MENTIONS.search(text) is not None


def copies_reference(text: str, reference: str | None) -> bool:
    """The answer is the reference, or contains a long reference verbatim (ignoring case and spacing)."""
    if not reference:
        return False
    ref, ans = normalise(reference), normalise(text)
    return ans == ref or (len(ref) >= 40 and ref in ans)


@dataclass(frozen=True)
class Filters:
    """Which filters are on; `truncated` drops answers cut at the token limit."""

    empty: bool = True
    truncated: bool = True
    repetition: bool = True
    reference: bool = True
    duplicates: bool = True

    def check_and_record(self, text: str, finish_reason: str, reference: str | None, seen: set[str]) -> str | None:
        """The first reason to reject an answer, or None to keep it; a kept answer is added to `seen` (the
        normalised answers kept so far) so that a later copy of it is rejected as a duplicate.
        """
        if self.empty and not text.strip():
            return "empty"
        if self.truncated and finish_reason == "length":
            return "truncated"
        if self.repetition and is_repetitive(text):
            return "repetition"
        if self.reference and copies_reference(text, reference):
            return "copies_reference"
        if self.reference and mentions_reference(text):
            return "mentions_reference"
        if self.duplicates:
            key = normalise(text)
            if key in seen:
                return "duplicate"
            seen.add(key)
        return None
