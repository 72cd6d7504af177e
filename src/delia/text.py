"""Text normalisers: which differences between two texts count.

`normalise` ignores case and spacing only (deduplication, copy and overlap checks); `normalize_answer`
also ignores punctuation and Unicode compatibility forms (scoring short answers); `shorten` is a text as a
one-line excerpt for a report or a log line.
"""

from __future__ import annotations

import unicodedata


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form of a text, for deduplication and overlap checks."""
    return " ".join(text.split()).lower()


def normalize_answer(text: str) -> str:
    """Casefolded, punctuation turned into spaces, whitespace collapsed (NFKC first)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def shorten(text: str, chars: int) -> str:
    """The text on one line, cut to `chars` characters with an ellipsis: an excerpt that never breaks a layout."""
    text = " ".join(text.split())
    return text if len(text) <= chars else text[:chars - 1] + "…"
